"""The applications: the ``hdar`` toolbox command (:mod:`.cli`), the ``hdar-pipeline`` BIDS App (its runner
:mod:`.bids_app`), ``hdar demo`` (:mod:`.demo`, its synthetic dataset :mod:`.demo_dataset`) and ``hdar benchmark``
(:mod:`.benchmark`).
"""
