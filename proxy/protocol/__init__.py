"""The PostgreSQL start-up protocol, sans-IO: bytes in, typed events and actions out.

Owns: the packet formats (wire), the order of a connection's start-up packets (negotiation),
the decisions that end a start-up (decision: Allow, Reject), the PROXY protocol header a load
balancer puts first (proxyproto), and the backend's BackendKeyData seen in passing
(backendkey). Must not import any other layer of the proxy, touch sockets, the event loop, the
clock, the config or metrics.
"""
