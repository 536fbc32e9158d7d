"""provisioning/project.yml gives every participant a complete, mutually-trusted startup kit."""

import argparse
import datetime
import json

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
from cryptography.x509.oid import NameOID

from fedesm.cli import poc
from fedesm.launch.network import DEFAULT_PROJECT_FILE, NetworkError, provision, render_project

SERVER_NAME = "fl.fedesm.example"
FL_PORT = 18002


def _project():
    return yaml.safe_load(DEFAULT_PROJECT_FILE.read_text())


def _participants(kind):
    return [p for p in _project()["participants"] if p["type"] == kind]


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _attr(cert, oid):
    return cert.subject.get_attributes_for_oid(oid)[0].value


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    rendered = render_project(DEFAULT_PROJECT_FILE, root / "project.yml", server_name="localhost", fl_port=FL_PORT)
    return provision(rendered, root / "ws")


@pytest.fixture(scope="module")
def named_kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov_named")
    rendered = render_project(DEFAULT_PROJECT_FILE, root / "project.yml", server_name=SERVER_NAME)
    return provision(rendered, root / "ws")


def test_project_has_server_two_sites_with_own_orgs_and_admin_roles():
    project = _project()
    assert project["name"] == "fedesm"
    assert project["connection_security"] == "mtls"
    assert len(_participants("server")) == 1
    sites = _participants("client")
    assert [s["name"] for s in sites] == ["site-1", "site-2"]
    assert len({s["org"] for s in sites}) == 2
    admins = _participants("admin")
    assert [a["role"] for a in admins].count("project_admin") == 1
    org_admins = {a["org"] for a in admins if a["role"] == "org_admin"}
    assert org_admins == {s["org"] for s in sites}
    static = next(b for b in project["builders"] if b["path"].endswith("StaticFileBuilder"))
    assert static["args"]["scheme"] == "grpc"


def test_render_project_substitutes_server_name_and_ports_only(tmp_path):
    out = render_project(DEFAULT_PROJECT_FILE, tmp_path / "p.yml", server_name="a.b.example", fl_port=1234, admin_port=1235)
    rendered, original = yaml.safe_load(out.read_text()), _project()
    server = next(p for p in rendered["participants"] if p["type"] == "server")
    assert (server["name"], server["fed_learn_port"], server["admin_port"]) == ("a.b.example", 1234, 1235)
    assert [p for p in rendered["participants"] if p["type"] != "server"] == [
        p for p in original["participants"] if p["type"] != "server"
    ]
    assert rendered["builders"] == original["builders"]


def test_render_project_rejects_a_file_without_one_server(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"name": "x", "participants": [{"name": "site-1", "type": "client"}]}))
    with pytest.raises(NetworkError, match="exactly one participant of type 'server'"):
        render_project(bad, tmp_path / "out.yml", server_name="localhost")
    assert not (tmp_path / "out.yml").exists()


def test_render_project_rejects_a_server_name_that_is_not_a_host_name(tmp_path):
    with pytest.raises(NetworkError, match="invalid server name 'fl server'"):
        render_project(DEFAULT_PROJECT_FILE, tmp_path / "out.yml", server_name="fl server")
    assert list(tmp_path.iterdir()) == []


def test_poc_provision_command_writes_kits_for_the_given_server(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    poc.register(parser.add_subparsers())
    args = parser.parse_args(["poc", "provision", "--server-name", "fl.test.example", "--workspace", str(tmp_path)])
    assert args.func(args) == 0
    kit = tmp_path / "fedesm" / "prod_00" / "fl.test.example"
    assert _attr(_cert(kit / "startup" / "server.crt"), NameOID.COMMON_NAME) == "fl.test.example"
    assert str(tmp_path / "fedesm" / "prod_00") in capsys.readouterr().out


def test_every_participant_has_a_kit_with_its_certificate_key_and_root_ca(kits):
    names = [p["name"] for p in _project()["participants"] if p["type"] != "server"] + ["localhost"]
    assert sorted(d.name for d in kits.iterdir() if d.is_dir()) == sorted(names)
    root_pem = (kits / "localhost" / "startup" / "rootCA.pem").read_bytes()
    for name in names:
        startup = kits / name / "startup"
        base = "server" if name == "localhost" else "client"
        for f in ("rootCA.pem", f"{base}.crt", f"{base}.key"):
            assert (startup / f).is_file(), f"{name}: missing startup/{f}"
        assert (startup / "rootCA.pem").read_bytes() == root_pem, f"{name}: different root CA"
    for site in _participants("client"):
        assert (kits / site["name"] / "startup" / "sub_start.sh").is_file()
    for admin in _participants("admin"):
        assert (kits / admin["name"] / "startup" / "fed_admin.json").is_file()


def test_certificates_chain_to_the_root_ca_and_match_their_keys(kits):
    root = _cert(kits / "localhost" / "startup" / "rootCA.pem")
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.timezone.utc)
    participants = [("localhost", "server", "hub", None)]
    participants += [(p["name"], "client", p["org"], None) for p in _participants("client")]
    participants += [(p["name"], "client", p["org"], p["role"]) for p in _participants("admin")]
    for name, base, org, role in participants:
        startup = kits / name / "startup"
        cert = _cert(startup / f"{base}.crt")
        cert.verify_directly_issued_by(root)  # raises if the signature or issuer does not match
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert _attr(cert, NameOID.COMMON_NAME) == name
        assert _attr(cert, NameOID.ORGANIZATION_NAME) == org
        if role:
            assert _attr(cert, NameOID.UNSTRUCTURED_NAME) == role
        key = load_pem_private_key((startup / f"{base}.key").read_bytes(), password=None)
        pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        assert pub == cert.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def test_a_certificate_from_another_project_does_not_chain(kits, named_kits):
    other_root = _cert(named_kits / SERVER_NAME / "startup" / "rootCA.pem")
    site_cert = _cert(kits / "site-1" / "startup" / "client.crt")
    with pytest.raises(Exception):
        site_cert.verify_directly_issued_by(other_root)
    # and the signature check itself is real: the same bytes verify with the right root
    root = _cert(kits / "site-1" / "startup" / "rootCA.pem")
    root.public_key().verify(
        site_cert.signature, site_cert.tbs_certificate_bytes, padding.PKCS1v15(), site_cert.signature_hash_algorithm
    )


def test_kits_point_at_the_server_over_grpc_with_mutual_tls(kits):
    server_cfg = json.loads((kits / "localhost" / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server_cfg["service"] == {"target": f"localhost:{FL_PORT}", "scheme": "grpc"}
    assert server_cfg["connection_security"] == "mtls"
    for site in _participants("client"):
        cfg = json.loads((kits / site["name"] / "startup" / "fed_client.json").read_text())
        assert cfg["servers"][0]["service"] == {"target": f"localhost:{FL_PORT}", "scheme": "grpc"}
        assert cfg["client"]["connection_security"] == "mtls"
        assert cfg["client"]["ssl_root_cert"] == "rootCA.pem"
    for admin in _participants("admin"):
        cfg = json.loads((kits / admin["name"] / "startup" / "fed_admin.json").read_text())["admin"]
        assert (cfg["host"], cfg["port"], cfg["scheme"]) == ("localhost", FL_PORT, "grpc")
        assert cfg["username"] == admin["name"] and cfg["connection_security"] == "mtls"


def test_server_certificate_names_the_given_server(named_kits):
    cert = _cert(named_kits / SERVER_NAME / "startup" / "server.crt")
    assert _attr(cert, NameOID.COMMON_NAME) == SERVER_NAME
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SERVER_NAME in san.get_values_for_type(x509.DNSName)
    cfg = json.loads((named_kits / "site-1" / "startup" / "fed_client.json").read_text())
    assert cfg["servers"][0]["service"]["target"] == f"{SERVER_NAME}:8002"
    assert cfg["servers"][0]["identity"] == SERVER_NAME
