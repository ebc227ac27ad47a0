"""Speed without touching the model: each backend turns a plain U-Net into a faster one with the same
outputs by swapping its modules, by type, for subclasses or drop-in modules.

    modules.py   swapping helpers (retype a module in place, replace children by type)
    cpu.py       CPU kernels: oneDNN weight packing, fused q/k/v, bf16 GroupNorm and attention routing
    guided.py    a sampling run's U-Net: text keys/values and time projections once per run, and the
                 layers before the text run once for both guidance halves
"""
