"""A job does not choose which repository a site downloads its backbone from."""

import pytest

from fedesm.errors import FedesmError
from fedesm.site_config import SiteConfig, backbone_source


def _site(backbone=None):
    return SiteConfig(site="site-1", train="t.fa", val="v.fa", backbone=backbone)


@pytest.mark.parametrize("job_backbone", ["hf:attacker/esm2-with-a-payload", "hf:facebook/esm2_t6_8M_UR50D"])
def test_a_jobs_hugging_face_id_is_refused_when_the_site_names_no_backbone(job_backbone):
    with pytest.raises(FedesmError) as e:
        backbone_source(_site(), job_backbone)
    message = str(e.value)
    assert message.startswith("site-1: the job's model.backbone hf:") and "site config names it" in message
    assert "\n" not in message


def test_the_sites_own_backbone_wins_and_the_job_may_name_public_or_checked_ones():
    assert backbone_source(_site("hf:facebook/esm2_t6_8M_UR50D"), "hf:attacker/x") == "hf:facebook/esm2_t6_8M_UR50D"
    assert backbone_source(_site("/models/esm2.pt"), "random:esm2_t2_tiny") == "/models/esm2.pt"
    # random weights, fair-esm's own hub names and paths (which the site's allow-list checks when loading)
    for job_backbone in ("random:esm2_t2_tiny", "esm2_t6_8M_UR50D", "/models/esm2.pt", "s3://b/esm2.pt"):
        assert backbone_source(_site(), job_backbone) == job_backbone
