"""Fine-tuning of partly quantized models under DeepSpeed (DESIGN.md §4).

:mod:`dist_pgkm.finetune.engine` is the only module of dist-pgkm that imports DeepSpeed, and it
does so inside its functions: importing this package stays light. See docs/finetune.md.
"""
