"""What the ``iopfl`` commands do, above the engine: training and demo runs (:mod:`.train`), outside
adaptation (:mod:`.adapt`) and prediction (:mod:`.predict`) on a run directory (:mod:`.runs`), and
what they show in the terminal (:mod:`.terminal`)."""
