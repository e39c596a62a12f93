"""The multi-ISP netns lab (docs/lab.md): topology.Lab builds and removes it, gateway runs
`snatgw run` in it, servers/clients send real traffic and report what the far end saw, demo is
`snatgw demo`.  Everything needs root and stays inside namespaces the lab created."""
