"""pdproxy's own HTTP/1.1 server for its listeners (asyncio protocols + httptools).

Import from the submodules (`pdproxy.http.server`, `.response`, `.router`, ...): this package imports nothing, so
`pdproxy.errors` can import `pdproxy.http.response` without a cycle.
"""
