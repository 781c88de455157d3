"""``global``: the val-selected global model θ* as is — the FedAvg-style baseline of DESIGN §2.3
(McMahan et al., AISTATS 2017).

Update rule: none. Prediction: softmax(f_θ*(x)) in eval mode, normalisation with the training
running statistics.
"""

from iopfl.adapt.base import TTAMethod


class GlobalModel(TTAMethod):
    name = "global"
