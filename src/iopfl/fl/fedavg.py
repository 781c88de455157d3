"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017).

Client k: θ_k^t = LocalTrain(θ^{t-1}). Server: θ^t = Σ_k n_k θ_k^t / Σ_k n_k.
The behaviour is the base class's; this class only names it.
"""

from iopfl.fl.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
