"""``pmreplica-agent`` on a node where python3-pyverbs is not installed: the folders that
would give this interpreter pyverbs (the venv's .pth shim, Debian's dist-packages folder)
are taken away before the agent starts, so importing pyverbs fails for real."""

import os
import sys

sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "pyverbs"))]

from rpmem_common import verbs_common  # noqa: E402

verbs_common.DEBIAN_PYVERBS = "/nonexistent/pyverbs"

from remote_agent.main import main  # noqa: E402

sys.exit(main())
