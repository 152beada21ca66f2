"""tests/unit: no MPI, one process. tests/parallel: named checks run on every rank of horovodrun jobs
(np 2-4, see tests/parallel/conftest.py). tests/integration: the CLI, the examples and faults, each a
whole job. tests/support holds what they share (launch.py, reference.py) and is put on sys.path here."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))
