"""Child processes the lab, the demo, the benches and the tests start: one launcher (`child.Child`), and etcd on it."""
