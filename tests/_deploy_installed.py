"""Run by tests/test_wheel.py with the Python of the environment the wheel was installed in: the tests'
deployment driver (``_deploy``, found beside this file) over the installed package — Flower's tools from
that environment's bin/, the app folder from the installed iopfl. Prints one JSON line; SIGTERM stops
the deployment (SystemExit → ``Deployment.__exit__``).

Arguments: FLWR_HOME DATA CONFIG RUN_DIR PIDS_FILE SITES_JSON OVERRIDES_JSON.
"""

import json
import signal
import sys
from pathlib import Path

from _deploy import APP_DIR, Deployment


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    home, data, config, run, pids = map(Path, sys.argv[1:6])
    sites, overrides = json.loads(sys.argv[6]), json.loads(sys.argv[7])
    with Deployment(home) as d:
        d.start_superlink(timeout=120)
        for site in sites:
            d.add_supernode(site, data)
        pids.write_text(json.dumps([p.pid for p in d.procs.values()]))
        d.wait_for_nodes(len(sites), timeout=180)  # generous: a loaded 2-core machine starts them slowly
        outcome = d.run(config, run, overrides=overrides, nodes=len(sites), timeout=240)
        logs = d.log_text()
    report = {"app": str(APP_DIR), "status": outcome.status, "output": outcome.output[-3000:], "logs": logs[-3000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
