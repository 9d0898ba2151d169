"""The engine imports no domain code (EDM, chemistry, force fields, data, Boltz, LM)."""

import subprocess
import sys


def test_engine_imports_no_domain_module():
    code = (
        "import sys, pkgutil, importlib, elign.engine as e\n"
        "for m in pkgutil.walk_packages(e.__path__, 'elign.engine.'): importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.startswith(('elign.edm', 'elign.chem', 'elign.forcefield',"
        " 'elign.data', 'boltz_ft', 'molgen_grpo', 'rdkit', 'tblite', 'fairchem')))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"engine pulled in domain modules: {out.stdout} {out.stderr[-500:]}"
