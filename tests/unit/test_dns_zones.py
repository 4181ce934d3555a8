"""
Local data features: minimal answers to ANY over UDP (RFC 8482), and zone
files with $INCLUDE and $GENERATE.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.rcode
import dns.rdatatype
import dns.reversename

from tests.unit.test_dns import ask, errors, server, texts


def test_any_over_udp_is_one_hinfo_and_over_tcp_every_set(tmp_path: Path) -> None:
    srv = server(tmp_path)
    small = ask(srv, "netd.test", "ANY")
    assert texts(small) == ['netd.test. 8482 IN HINFO "RFC8482" ""']
    assert small.rcode() == dns.rcode.NOERROR
    full = ask(srv, "netd.test", "ANY", udp=False)
    types = {rrset.rdtype for rrset in full.answer}
    assert {dns.rdatatype.MX, dns.rdatatype.TXT, dns.rdatatype.NS, dns.rdatatype.CAA} <= types
    # Prepared answers are kept apart by transport: UDP stays minimal after TCP.
    assert texts(ask(srv, "netd.test", "ANY")) == ['netd.test. 8482 IN HINFO "RFC8482" ""']


def test_any_for_a_name_without_records_answers_as_any_type(tmp_path: Path) -> None:
    srv = server(tmp_path)
    missing = ask(srv, "nope.netd.test", "ANY")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority
    assert ask(srv, "x.apps.netd.test", "ANY").answer[0].rdtype == dns.rdatatype.HINFO


def test_include_reads_a_file_beside_the_zone_with_its_own_origin(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    (zones / "parts").mkdir(parents=True)
    (zones / "inc.test.zone").write_text(
        "$TTL 300\n@ SOA ns hostmaster 7 3600 600 86400 30\n"
        "$INCLUDE parts/hosts.inc\n"
        "$INCLUDE parts/lab.inc lab.inc.test.\n"
        "after A 10.0.0.9\n"
    )
    (zones / "parts" / "hosts.inc").write_text('www A 10.0.0.1\n  TXT "from an include"\n')
    (zones / "parts" / "lab.inc").write_text("$INCLUDE more.inc\nbox A 10.0.1.1\n")
    (zones / "parts" / "more.inc").write_text("deep A 10.0.2.1\n")
    srv = server(tmp_path, "    zone_files: [zones/inc.test.zone]\n")
    assert texts(ask(srv, "www.inc.test")) == ["www.inc.test. 300 IN A 10.0.0.1"]
    assert texts(ask(srv, "www.inc.test", "TXT")) == ['www.inc.test. 300 IN TXT "from an include"']
    assert texts(ask(srv, "box.lab.inc.test")) == ["box.lab.inc.test. 300 IN A 10.0.1.1"]
    assert texts(ask(srv, "deep.lab.inc.test")) == ["deep.lab.inc.test. 300 IN A 10.0.2.1"]
    # The origin is the zone's again after each include.
    assert texts(ask(srv, "after.inc.test")) == ["after.inc.test. 300 IN A 10.0.0.9"]


def test_include_stays_in_the_zone_folder_and_out_of_loops(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (tmp_path / "secret.txt").write_text("www A 10.6.6.6\n")
    (zones / "escape.zone").symlink_to(tmp_path / "secret.txt")
    (zones / "a.test.zone").write_text("www A 10.0.0.1\n$INCLUDE ../secret.txt\n")
    (zones / "b.test.zone").write_text(f"$INCLUDE {tmp_path / 'secret.txt'}\n")
    (zones / "c.test.zone").write_text("$INCLUDE escape.zone\n")
    (zones / "d.test.zone").write_text("$INCLUDE loop.inc\n")
    (zones / "loop.inc").write_text("x A 10.0.0.1\n$INCLUDE d.test.zone\n")
    (zones / "e.test.zone").write_text("$INCLUDE e.test.zone\n")
    (zones / "f.test.zone").write_text("$INCLUDE\n")
    names = "abcdef"
    found = errors(
        tmp_path, f"    zone_files: [{', '.join(f'zones/{n}.test.zone' for n in names)}]\n"
    )
    assert len(found) == len(names), found
    a, b, c, d, e, f = found
    assert "a.test.zone line 2: $INCLUDE ../secret.txt: outside the zone file's folder" in a
    assert "outside the zone file's folder" in b and "outside the zone file's folder" in c
    assert "d.test.zone line 1: loop.inc line 2: $INCLUDE d.test.zone: the file includes" in d
    assert "e.test.zone line 1: $INCLUDE e.test.zone: the file includes itself" in e
    assert "f.test.zone line 1: expected $INCLUDE FILE [ORIGIN]" in f


def test_include_depth_is_bounded(tmp_path: Path) -> None:
    for level in range(12):
        (tmp_path / f"n{level}.inc").write_text(f"$INCLUDE n{level + 1}.inc\n")
    (tmp_path / "deep.test.zone").write_text("$INCLUDE n0.inc\n")
    (found,) = errors(tmp_path, "    zone_files: [deep.test.zone]\n")
    assert "files included more than 8 deep" in found


def test_generate_with_modifiers(tmp_path: Path) -> None:
    (tmp_path / "gen.test.zone").write_text(
        "$GENERATE 1-100 host-$ A 10.0.0.$\n"
        "$GENERATE 0-10/5 ${10,3} 120 IN CNAME host-${1}\n"
        '$GENERATE 250-255 x${0,4,x} TXT "n=${0,0,X}" price\\$5\n'
        "$GENERATE 8-9 o${0,3,o} AAAA fd00::$\n"
    )
    srv = server(tmp_path, "    zone_files: [gen.test.zone]\n")
    assert texts(ask(srv, "host-1.gen.test")) == ["host-1.gen.test. 60 IN A 10.0.0.1"]
    assert texts(ask(srv, "host-100.gen.test")) == ["host-100.gen.test. 60 IN A 10.0.0.100"]
    assert ask(srv, "host-101.gen.test").rcode() == dns.rcode.NXDOMAIN
    assert texts(ask(srv, "015.gen.test", "CNAME")) == [
        "015.gen.test. 120 IN CNAME host-6.gen.test."
    ]
    assert ask(srv, "011.gen.test", "CNAME").rcode() == dns.rcode.NXDOMAIN
    # Without $TTL, a record without a TTL has the last one given (RFC 1035 5.1): 120.
    assert texts(ask(srv, "x00ff.gen.test", "TXT")) == [
        'x00ff.gen.test. 120 IN TXT "n=FF" "price$5"'
    ]
    assert texts(ask(srv, "o011.gen.test", "AAAA")) == ["o011.gen.test. 120 IN AAAA fd00::9"]


def test_generate_is_bounded_and_checked(tmp_path: Path) -> None:
    (tmp_path / "a.test.zone").write_text("$GENERATE 0-65536 h$ A 10.0.0.1\n")
    (tmp_path / "b.test.zone").write_text("x A 10.0.0.1\n$GENERATE 10-1 h$ A 10.0.0.1\n")
    (tmp_path / "c.test.zone").write_text("$GENERATE 1-2 h${0,1,q} A 10.0.0.1\n")
    (tmp_path / "d.test.zone").write_text("$GENERATE 1-300 h$ A 10.0.0.$\n")
    (tmp_path / "e.test.zone").write_text("$GENERATE one-2 h$ A 10.0.0.1\n")
    found = errors(
        tmp_path,
        "    zone_files: [a.test.zone, b.test.zone, c.test.zone, d.test.zone, e.test.zone]\n",
    )
    a, b, c, d, e = found
    assert "a.test.zone line 1: $GENERATE makes 65537 records, more than 65536" in a
    assert "b.test.zone line 2: an empty $GENERATE range: '10-1'" in b
    assert "base 'q' is not one of d, o, x, X, n, N" in c
    assert "d.test.zone line 1: not an IPv4 address: '10.0.0.256'" in d
    assert "not a $GENERATE range: 'one-2'" in e


def test_generate_bind_documentation_examples(tmp_path: Path) -> None:
    # The examples of BIND 9's reference manual, "The $GENERATE Directive".
    (tmp_path / "0.0.192.in-addr.arpa.zone").write_text(
        "$TTL 300\n$GENERATE 1-2 @ NS SERVER$.EXAMPLE.\n$GENERATE 1-127 $ CNAME $.0\n"
    )
    (tmp_path / "example.zone").write_text(
        "$TTL 300\n"
        "$GENERATE 1-127 HOST-$ A 1.2.3.$\n"
        '$GENERATE 1-127 HOST-$ MX "0 ."\n'
        "$GENERATE 0-2 HOST-${0,4,d} A 1.2.3.${1,0,d}\n"
        "$GENERATE 1024-1026 ${0,3,n} AAAA 2001:db8::${0,4,x}\n"
    )
    srv = server(tmp_path, "    zone_files: [0.0.192.in-addr.arpa.zone, example.zone]\n")
    assert sorted(texts(ask(srv, "0.0.192.in-addr.arpa", "NS"))[0].split("\n")) == [
        "0.0.192.in-addr.arpa. 300 IN NS server1.example.",
        "0.0.192.in-addr.arpa. 300 IN NS server2.example.",
    ]
    assert texts(ask(srv, "127.0.0.192.in-addr.arpa", "CNAME")) == [
        "127.0.0.192.in-addr.arpa. 300 IN CNAME 127.0.0.0.192.in-addr.arpa."
    ]
    assert texts(ask(srv, "host-3.example")) == ["host-3.example. 300 IN A 1.2.3.3"]
    assert texts(ask(srv, "host-127.example", "MX")) == ["host-127.example. 300 IN MX 0 ."]
    assert texts(ask(srv, "host-0002.example")) == ["host-0002.example. 300 IN A 1.2.3.3"]
    for number in range(3):
        assert texts(ask(srv, f"{number}.0.4.example", "AAAA")) == [
            f"{number}.0.4.example. 300 IN AAAA 2001:db8::40{number}"
        ]


def test_generate_nibbles_width_counts_the_dots_as_bind(tmp_path: Path) -> None:
    (tmp_path / "nib.test.zone").write_text(
        "$TTL 60\n"
        # Width 1 or 0: the value's own nibbles, however many.
        "$GENERATE 255-255 a.${0,1,n} A 10.0.0.1\n"
        # Odd widths pad with zero nibbles; an even width ends in the dot (so the
        # name is absolute, as in BIND), and N is upper case.
        "$GENERATE 10-10 b.${0,5,N}.nib.test. A 10.0.0.2\n"
        "$GENERATE 10-10 c.${0,4,n}nib.test. A 10.0.0.3\n"
        # A negative offset and a $$ for a dollar sign.
        "$GENERATE 5-5 d.${-5,3,n} TXT cost$$${-4}\n"
    )
    srv = server(tmp_path, "    zone_files: [nib.test.zone]\n")
    assert texts(ask(srv, "a.f.f.nib.test")) == ["a.f.f.nib.test. 60 IN A 10.0.0.1"]
    assert texts(ask(srv, "b.a.0.0.nib.test")) == ["b.a.0.0.nib.test. 60 IN A 10.0.0.2"]
    assert texts(ask(srv, "c.a.0.nib.test")) == ["c.a.0.nib.test. 60 IN A 10.0.0.3"]
    assert texts(ask(srv, "d.0.0.nib.test", "TXT")) == ['d.0.0.nib.test. 60 IN TXT "cost$1"']


def test_generate_ip6_arpa_pointers_and_ttl_class_in_either_order(tmp_path: Path) -> None:
    (tmp_path / "0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.zone").write_text(
        "$TTL 60\n"
        "$GENERATE 0-255 ${0,31,n} IN 300 PTR host-${0,2,x}.lab.test.\n"
        "$GENERATE 256-257 ${0,31,n} 120 IN PTR host-$.lab.test.\n"
    )
    srv = server(tmp_path, "    zone_files: [0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.zone]\n")
    name = dns.reversename.from_address("2001:db8::ff").to_text()
    assert texts(ask(srv, name, "PTR")) == [f"{name} 300 IN PTR host-ff.lab.test."]
    name = dns.reversename.from_address("2001:db8::101").to_text()
    assert texts(ask(srv, name, "PTR")) == [f"{name} 120 IN PTR host-257.lab.test."]
    outside = dns.reversename.from_address("2001:db8::1:0").to_text()
    assert ask(srv, outside, "PTR").rcode() == dns.rcode.NXDOMAIN


def test_generate_modifiers_are_checked(tmp_path: Path) -> None:
    lines = {
        "a": "$GENERATE 1-2 h${0,x} A 10.0.0.1",
        "b": "$GENERATE 1-2 h${0,200} A 10.0.0.1",
        "c": "$GENERATE 0-1 h${-1,0,n} A 10.0.0.1",
        "d": "$GENERATE 0-1 h${-1,0,x} A 10.0.0.1",
        "e": "$GENERATE 0-2147483648 h$ A 10.0.0.1",
        "f": "$GENERATE 1-2 h${1 A 10.0.0.1",
    }
    for name, line in lines.items():
        (tmp_path / f"{name}.test.zone").write_text(line + "\n")
    found = errors(tmp_path, f"    zone_files: [{', '.join(f'{n}.test.zone' for n in lines)}]\n")
    a, b, c, d, e, f = found
    assert "a.test.zone line 1: not a $GENERATE modifier in 'h${0,x}'" in a
    assert "$GENERATE width 200 is more than 127" in b
    assert "$GENERATE value -1 is negative, and base 'n' is not d" in c
    assert "$GENERATE value -1 is negative, and base 'x' is not d" in d
    assert "$GENERATE range '0-2147483648' goes past 2147483647" in e
    assert "not a $GENERATE modifier in 'h${1'" in f


def test_master_file_syntax_as_bind_reads_it(tmp_path: Path) -> None:
    # RFC 1035 5.1: escapes in names and strings, parentheses and ";" inside quotes are
    # text, a relative $ORIGIN hangs under the one before, and without $TTL a record
    # without a TTL has the last one given.
    (tmp_path / "syntax.test.zone").write_text(
        "@ 300 SOA ns hostmaster 1 3600 600 86400 30\n"
        "a\\.b A 10.0.0.1\n"
        "sp\\032ace A 10.0.0.2\n"
        'quoted TXT "has (paren) inside" "dec\\065x" "\\195\\169" "x\\\\" ; a comment\n'
        "plain TXT semi\\;colon\n"
        "$ORIGIN sub\n"
        "inner A 10.0.0.3\n"
    )
    srv = server(tmp_path, "    zone_files: [syntax.test.zone]\n")
    assert texts(ask(srv, "a\\.b.syntax.test")) == ["a\\.b.syntax.test. 300 IN A 10.0.0.1"]
    assert texts(ask(srv, "sp\\032ace.syntax.test")) == [
        "sp\\032ace.syntax.test. 300 IN A 10.0.0.2"
    ]
    [txt] = ask(srv, "quoted.syntax.test", "TXT").answer[0]
    assert txt.strings == (b"has (paren) inside", b"decAx", "é".encode(), b"x\\")
    [semi] = ask(srv, "plain.syntax.test", "TXT").answer[0]
    assert semi.strings == (b"semi;colon",)
    assert texts(ask(srv, "inner.sub.syntax.test")) == ["inner.sub.syntax.test. 300 IN A 10.0.0.3"]


def test_a_ttl_past_31_bits_is_refused(tmp_path: Path) -> None:
    # RFC 2181 8: it could not go on the wire, and every answer for the name failed.
    (tmp_path / "big.test.zone").write_text("@ 4294967296 A 10.0.0.1\n")
    (found,) = errors(tmp_path, "    zone_files: [big.test.zone]\n")
    assert "at most 2147483647 seconds" in found


def test_a_delegation_inside_a_zone_answers_with_a_referral(tmp_path: Path) -> None:
    # RFC 1034 4.3.2 step 3b: below a zone cut the parent holds no answers: no AA,
    # the cut's NS records in authority, their addresses (glue) in additional.
    (tmp_path / "parent.test.zone").write_text(
        "$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 30\n@ NS ns\nns A 10.0.0.53\n"
        "child NS ns.child\nchild NS ns.elsewhere.test.\nns.child A 10.0.1.53\n"
        "www A 10.0.0.80\nalias CNAME x.child\n"
    )
    srv = server(tmp_path, "    zone_files: [parent.test.zone]\n")
    for name, rdtype in (("x.child.parent.test", "A"), ("child.parent.test", "NS")):
        referral = ask(srv, name, rdtype)
        assert referral.rcode() == dns.rcode.NOERROR and not referral.answer
        assert not referral.flags & dns.flags.AA
        assert [str(rrset) for rrset in referral.authority] == [
            "child.parent.test. 300 IN NS ns.child.parent.test.\n"
            "child.parent.test. 300 IN NS ns.elsewhere.test."
        ]
        assert [str(rrset) for rrset in referral.additional] == [
            "ns.child.parent.test. 300 IN A 10.0.1.53"
        ]
    # Above the cut, answers as before; a CNAME into the child stops at the cut.
    assert texts(ask(srv, "www.parent.test")) == ["www.parent.test. 300 IN A 10.0.0.80"]
    assert texts(ask(srv, "alias.parent.test")) == [
        "alias.parent.test. 300 IN CNAME x.child.parent.test."
    ]


def test_a_cname_beside_other_records_is_refused(tmp_path: Path) -> None:
    # RFC 1034 3.6.2, RFC 2181 10.1: BIND refuses to load it; answers would disagree.
    (tmp_path / "clash.test.zone").write_text("www A 10.0.0.1\nwww CNAME other.test.\n")
    (found,) = errors(tmp_path, "    zone_files: [clash.test.zone]\n")
    assert "www.clash.test. has a CNAME and other records" in found
    (found,) = errors(tmp_path, "    records:\n      a.map.test: {CNAME: [b.map.test], TXT: [x]}\n")
    assert "a name with a CNAME has no other records" in found
