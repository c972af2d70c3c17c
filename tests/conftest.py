import os

# Tests share 2 cores with everything else: keep torch to one thread and bars quiet.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("QCORE_PROGRESS", "0")
