"""Configuration: the keepalived-style file and ipvsadm syntax (parse, adm) to GatewayConfig
(schema).  Only constants live here, so that light modules (the control socket) can use them
without importing the parser."""

#: a config file larger than this is refused before it is read (100,000 rules take ~10 MB)
MAX_CONFIG_BYTES = 32 * 1024 * 1024
#: bytes of a unix socket's path (sun_path holds 108 with the NUL): `control_socket`'s limit
MAX_SOCKET_PATH = 107
