"""``global``: the val-selected global model as is (running statistics, no adaptation)."""

from iopfl.adapt.base import TTAMethod


class GlobalModel(TTAMethod):
    name = "global"
