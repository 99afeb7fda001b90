"""MQTT: the topic contract (`topics`), message validation (`messages`), wire errors (`errors`).

`topics`, `messages` and `errors` are pure (no sockets, no threads, no logging): they turn a
topic, payload bytes and already-extracted MQTT 5 properties into typed objects, or into a
`ProtocolError` that carries exactly the error payload of the wire contract (docs/API v1).
The transport lives beside them and is the only part that touches the network.
"""
