"""The offline tools: the replica of every source, the loopback services (replica, S3) and the demo.

Nothing here is imported by a live run: a source reaches the network only through ``emdata.acquire``.
"""
