//! A request's isolation report says which layers its attention verified and which
//! the depth gate left unchecked, and counts what verification did.

use kframe_engine::IsolationReport;
use kframe_testkit::sealed::{setup, step, tampered_pair};

#[test]
fn with_verification_off_at_a_layer_its_corruption_is_read_and_the_report_says_unchecked() {
    let s = setup();
    let alice = s.ring.frame("alice", 0).unwrap();
    let (mut a, mut b) = tampered_pair(&s, &alice, 40);
    let gates = vec![true, false];
    for c in [&mut a, &mut b] {
        c.set_verify(gates.clone());
    }
    assert_ne!(step(&s, &mut a, &alice), step(&s, &mut b, &alice), "unverified, the bytes are attended to");
    let f = a.take_findings();
    assert!(f.events.is_empty());
    let mut report = IsolationReport::new(&gates);
    report.add(&f);
    assert_eq!((report.checked_layers, report.unchecked_layers), (vec![0], vec![1]));
    assert_eq!(report.blocks_verified, 3 * 2, "layer 0 only: 3 blocks x 2 kv heads");
}
