"""The ClientApp of the failure tests: iopfl's, except that a node whose node config says
``fail-at-round=N`` raises in round N's training (the fault is the test's, not the product's)."""

from __future__ import annotations

import shutil
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from iopfl.engine.flower import client
from iopfl.engine.flower.server import APP_DIR

app = ClientApp()
app.query()(client.query)
app.query("publish")(client.publish)
app.evaluate()(client.evaluate)


def fail_if_asked(context: Context, round_: int) -> None:
    """``fail-at-round=N`` in the node config: raise in round N's training."""
    if int(context.node_config.get("fail-at-round", -1)) == round_:
        raise RuntimeError(f"injected failure at round {round_} (node config fail-at-round)")


@app.train()
def train(msg: Message, context: Context) -> Message:
    fail_if_asked(context, int(msg.content["config"]["round"]))
    return client.train(msg, context)


def faulty_app(folder: Path) -> Path:
    """A Flower app folder like iopfl's whose ClientApp is this module's."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, folder / "faulty_client.py")
    text = (APP_DIR / "pyproject.toml").read_text()
    ours = 'clientapp = "iopfl.engine.flower.client:app"'
    assert ours in text, "the app's pyproject.toml no longer names iopfl's ClientApp"
    (folder / "pyproject.toml").write_text(text.replace(ours, 'clientapp = "faulty_client:app"'))
    return folder
