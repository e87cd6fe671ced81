"""`python -m tinyllama_ft ...` that prints its own peak resident memory last on stderr
(`PEAK_RSS_KB n`, from getrusage), so two runs can be compared side by side. Test code only."""

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package of this checkout

from tinyllama_ft.cli import main

code = main(sys.argv[1:])
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
