"""Exit codes of `stockade` and `stockaded`, documented in the README: the only place they live.

The CLI and the daemon both return these names; no literal exit code appears anywhere else.
"""

OK = 0
USAGE = 1  # bad arguments (argparse also uses 2 for usage; we map it to 1)
REFUSED = 2  # the daemon or a policy refused the request
UNREACHABLE = 3  # the daemon (or the Docker engine) does not answer
FAILED = 4  # the operation was attempted and failed (e.g. an image build)
CONFIG = 78  # EX_CONFIG: bad settings; the daemon did not start
AUDIT_ROLLBACK = 78  # the audit log is behind a head the daemon signed: it did not start
STATE_ROLLBACK = 78  # a sealed state file or pinned key is not what the audit trail knows
INTERRUPTED = 130  # 128 + SIGINT, the shell's convention: the user pressed Ctrl-C
