"""The HTTP front door: the aiohttp application, its middleware and its handlers."""
