# Types of the names `convlens/__init__.py` imports on first use (PEP 562 __getattr__).
from convlens.api import AuditReport as AuditReport
from convlens.api import CheckReport as CheckReport
from convlens.api import Evaluation as Evaluation
from convlens.api import Run as Run
from convlens.api import audit as audit
from convlens.api import check as check
from convlens.api import evaluate as evaluate
from convlens.api import export as export
from convlens.api import load as load
from convlens.api import train as train
from convlens.errors import ConvlensError as ConvlensError

__version__: str
__all__: list[str]
