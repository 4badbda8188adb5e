"""Several devices for one image: Ulysses sequence parallelism over torch.distributed (`ulysses.py`), the
process group (`group.py`), worker processes that hold the DiT between jobs (`workers.py`) and the jobs they
run (`jobs.py`). Nothing here imports ComfyUI; gloo on CPU is tested, NCCL on GPUs is written the same way."""
