import sys
from pathlib import Path

# Make the shared helpers (xf_cases.py) importable whatever the rootdir/import mode.
sys.path.insert(0, str(Path(__file__).parent))
