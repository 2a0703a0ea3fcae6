"""sagaflow: durable sagas (process managers) for asyncio and trio."""
