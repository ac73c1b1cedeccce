"""Versions of the compat distribution (read by hatch) and of the APIs it emulates."""

# Distribution version of sparsek-flashcore-compat. hatch reads the first ``__version__`` assignment in this file.
__version__ = "0.1.0"

#: Last flashcore release whose public API this package reproduces.
FLASHCORE_API_VERSION = "0.5.0"
#: blackwell_sparsek release whose public API this package reproduces (it was never published).
BLACKWELL_SPARSEK_API_VERSION = "0.1.0"

#: ``flashcore.__version__``: the emulated API version with this distribution as a PEP 440 local label, so that
#: ``Version(flashcore.__version__) >= Version("0.5")`` still holds and the compat layer stays identifiable.
FLASHCORE_VERSION = f"{FLASHCORE_API_VERSION}+sparsek.compat.{__version__}"
#: ``blackwell_sparsek.__version__``, same scheme.
BLACKWELL_SPARSEK_VERSION = f"{BLACKWELL_SPARSEK_API_VERSION}+sparsek.compat.{__version__}"
