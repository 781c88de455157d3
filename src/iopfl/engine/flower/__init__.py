"""iopfl on Flower 1.41: the same strategies across machines (the only package that imports ``flwr``).

- ``server.app``: the ServerApp (rounds, sampling, aggregation in site order, selection, run directory,
  checkpoints, resume); ``client.app``: the ClientApp (one site: its data, its personal state);
- ``wire``: what a message carries; ``state``: a site's own store of its personal state;
- ``deploy``: start/stop a SuperLink and SuperNodes on this machine and ``flwr run`` the app
  (no ``flwr`` import: it drives Flower's command-line tools);
- ``app/``: the Flower app folder given to ``flwr run``.

See README, "Several machines (Flower)". Importing this package does not import ``flwr``.
"""
