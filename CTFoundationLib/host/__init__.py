"""Running the library for a host application: the background worker process and its protocol, the chat thread,
allocator tuning. Nothing here imports slicer or qt."""
