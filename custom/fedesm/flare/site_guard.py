"""FedesmSiteGuard: a participant-level component (local/resources.json, not a job's) that says which
fedesm and NVFLARE it runs and refuses jobs written by another fedesm.

Jobs carry no code (the site policy refuses ``app/custom``), so a site runs its *installed* fedesm
with the settings the job's configs carry. A bundle exported by another version may name settings
this version reads differently or not at all; ``meta.json``'s ``fedesm_version`` records who wrote
it. The guard compares it with the installed version:

* on a site, when the server deploys a job (NVFLARE's ``AUTHORIZE_COMMAND_CHECK`` for
  ``submit_job``): a refusal is the site's deploy reply, so it shows as one line in the job's
  ``job_deploy_detail`` (``site-1: fedesm version mismatch: ...``) and nothing is started there;
* on the server, when a job is submitted (``SUBMIT_JOB``): the submitter gets the line back.

`fedesm.settings.SiteGuardSettings.version_mismatch` decides refuse or warn. A job without a
recorded version (not written by fedesm, or with the record removed) is refused the same way: a
site cannot tell which fedesm wrote it. At ``SYSTEM_START`` the guard logs the fedesm, NVFLARE and
torch versions of the participant. What the job's configs hold is checked by
`fedesm.flare.job_check` (NVFLARE's app validator) once the app is unpacked.
"""

from __future__ import annotations

from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import AdminCommandNames, FLContextKey
from nvflare.apis.fl_context import FLContext

from fedesm import __version__
from fedesm.launch.jobs import VERSION_KEY
from fedesm.settings import SiteGuardSettings


def installed_versions() -> dict[str, str]:
    """fedesm, NVFLARE and torch versions of this Python environment."""
    import nvflare

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # a server may run without torch
        torch_version = "absent"
    return {"fedesm": __version__, "nvflare": nvflare.__version__, "torch": torch_version}


def version_problem(job_meta: Optional[dict], installed: str = __version__) -> Optional[str]:
    """One line when the job records no fedesm version or another than `installed`, else None."""
    meta = job_meta if isinstance(job_meta, dict) else {}
    recorded = meta.get(VERSION_KEY)
    name = str(meta.get("name") or meta.get("job_id") or "the job")[:60]
    if recorded is None:
        return (f"fedesm version missing: {name} records no {VERSION_KEY} in meta.json, so this participant "
                f"cannot tell which fedesm wrote it; export it with `fedesm job export` (fedesm {installed})")
    recorded = str(recorded)[:40]
    if recorded == installed:
        return None
    return (f"fedesm version mismatch: {name} was exported by fedesm {recorded}, this participant runs "
            f"{installed}; re-export it with fedesm {installed} (or upgrade the sites, docs/operations.md)")


class FedesmSiteGuard(FLComponent):
    def __init__(self, version_mismatch: Optional[str] = None):
        """Args:
            version_mismatch: refuse | warn (`SiteGuardSettings`); None takes the setting's default.
        """
        super().__init__()
        given = {} if version_mismatch is None else {"version_mismatch": version_mismatch}
        self.settings = SiteGuardSettings.from_dict(given, where="FedesmSiteGuard")

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.SYSTEM_START:
            versions = ", ".join(f"{k} {v}" for k, v in installed_versions().items())
            self.log_info(fl_ctx, f"{fl_ctx.get_identity_name()} runs {versions}; jobs of another fedesm "
                                  f"version: {self.settings.version_mismatch}", fire_event=False)
        elif event_type == EventType.AUTHORIZE_COMMAND_CHECK:
            if fl_ctx.get_prop(FLContextKey.COMMAND_NAME) != AdminCommandNames.SUBMIT_JOB:
                return  # only the deployment of a job (check_resources must not block scheduling forever)
            items = fl_ctx.get_prop(FLContextKey.SECURITY_ITEMS) or {}
            problem = version_problem(items.get(FLContextKey.JOB_META))
            if problem and self._refuses(problem, fl_ctx):
                fl_ctx.set_prop(FLContextKey.AUTHORIZATION_RESULT, False, sticky=False)
                fl_ctx.set_prop(FLContextKey.AUTHORIZATION_REASON, problem, sticky=False)
        elif event_type == EventType.SUBMIT_JOB:
            problem = version_problem(fl_ctx.get_prop(FLContextKey.JOB_META))
            if problem and self._refuses(problem, fl_ctx):
                fl_ctx.set_prop(FLContextKey.JOB_BLOCK_REASON, problem, private=True, sticky=False)

    def _refuses(self, problem: str, fl_ctx: FLContext) -> bool:
        if self.settings.version_mismatch == "warn":
            self.log_warning(fl_ctx, f"{problem} (running it: site_policy.version_mismatch is warn)", fire_event=False)
            return False
        self.log_error(fl_ctx, problem, fire_event=False)
        return True
