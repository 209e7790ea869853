"""Bulk erasure: apply deletion requests with DeltaGrad to every model that holds the data, publish
new versions, keep an audit and a receipt.

One idea per module:

* :mod:`.requests` — the inbox: files read, every row judged alone, identity (request_id, data_id);
* :mod:`.ledger`   — what each model settled, believed only where it agrees with its plans and lineage;
* :mod:`.lease`    — one run at a time per model output;
* :mod:`.plan`     — a run's plan and the markers of its steps; typed verify settings;
* :mod:`.run`      — one model's erasure: plan, replay, check, publish by compare-and-swap, settle;
* :mod:`.fleet`    — many models from one inbox, fanned out on Ray, one failing never stopping the others;
* :mod:`.status`   — the operator's view, the receipt (``trace``), abandon, repair, redaction;
* :mod:`.retention` — superseded versions deleted on a schedule.

The registry of published versions (``LATEST.json``, ``versions/``) is a storage format:
:mod:`deltagrad_ray.store.registry`.
"""

from ..store.registry import (LineageError as LineageError, Registry as Registry, VersionRecord as VersionRecord,
                              publish_initial as publish_initial, resolve_cache as resolve_cache)
from .fleet import Fleet as Fleet, FleetResult as FleetResult, ModelOutcome as ModelOutcome, erase_fleet as erase_fleet
from .lease import (Lease as Lease, LeaseBusy as LeaseBusy, LeaseLost as LeaseLost, LeaseSettings as LeaseSettings,
                    read_lease as read_lease)
from .ledger import Ledger as Ledger, settlements as settlements
from .plan import (Plan as Plan, ReconcileSettings as ReconcileSettings, Runs as Runs,
                   VerifySettings as VerifySettings)
from .requests import Inbox as Inbox, Request as Request, read_inbox as read_inbox
from .retention import RetentionSettings as RetentionSettings, prune as prune
from .run import Settings as Settings, Target as Target, bulk_erasure as bulk_erasure, erase_model as erase_model
from .status import (abandon as abandon, redact as redact, redaction_salt as redaction_salt, repair as repair,
                     status as status, trace as trace)
