"""trace3d-ns: Gaussian Instance Tracing (Trace3D, ICCV 2025) as a Nerfstudio method.

Kept import-light: nerfstudio imports this package through the method entry point.
"""

__version__ = "0.1.0"
