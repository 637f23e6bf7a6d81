"""One-command check of everything a user does, on CUDA (gsplat) or the CPU: see `__main__`."""
