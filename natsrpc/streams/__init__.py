"""Streams: an ``@rpc`` async generator's items sent one message each, under credit (docs/protocol.md).

:mod:`natsrpc.streams.produce` is the server side (the host runs it), :mod:`natsrpc.streams.consume`
the client side (the client and the proxies use it). They share only the wire protocol, in
:mod:`natsrpc.protocol`.
"""
