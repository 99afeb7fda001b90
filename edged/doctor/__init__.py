"""`edged doctor`: what will happen on this board, checked before the daemon runs.

`checks` turns plain inputs (cpuinfo text, sensor readings, probe results) into typed `Check`
results and renders them; `probes` does the I/O at the edges (the broker, the state directory,
the model); `run` puts them in order for the CLI.
"""

from edged.doctor.checks import Check, Status
from edged.doctor.run import DoctorOptions, run_checks

__all__ = ["Check", "DoctorOptions", "Status", "run_checks"]
