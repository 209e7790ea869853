"""The GPU correctness checks (tests/gpu/checks.py): the replays and a Ray fan-out on CUDA against the
CPU. test_cuda.py runs them on a CUDA device (marker ``cuda``, skipped without one;
scripts/gpu_check.sh runs them there), test_cpu.py runs the same checks CPU against CPU, so that every
code path the GPU run takes is exercised on any machine."""
