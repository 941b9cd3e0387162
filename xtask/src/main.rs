mod vm;
fn main() -> anyhow::Result<()> {
    let opts = vm::VmTestOptions {
        kernels: std::env::args().skip(1).collect(),
        test_binaries: vec![],
        work_dir: "target/vm".into(),
    };
    vm::vm_test(&opts)
}
