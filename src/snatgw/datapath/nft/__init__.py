"""The nftables backend: kernel conntrack does the NAT.  render.py turns a RuleSet into table
`ip snatgw` (+ policy routing for new_gw); backend.py applies it atomically and reads it back."""
