//! Generates the Rust code for `proto/causeway/v1/*.proto`. `protoc` comes from the
//! protoc-bin-vendored crate unless `PROTOC` names another one, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let protos = [
        "proto/causeway/v1/txlog.proto",
        "proto/causeway/v1/cluster.proto",
        "proto/causeway/v1/node.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
