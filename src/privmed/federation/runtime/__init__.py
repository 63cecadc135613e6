"""Where the roles run: Flower's ServerApp and ClientApp (``flower``), the commands that
start a node, a coordinator or both (``deploy``), Flower's processes (``launcher``,
``node_link``, ``fleet_gateway``), the federation's credentials (``certs``), the sites'
ledgers of a local job (``site_ledgers``) and a transport that calls nodes in this process
(``inprocess``). The one package that joins the node's and the coordinator's sides."""
