//! Generates the etcd v3 API (etcdserverpb, mvccpb, authpb) from `proto/` at build time.
//! `protox` parses the .proto files in pure Rust, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/etcdserverpb/rpc.proto",
        "proto/mvccpb/kv.proto",
        "proto/authpb/auth.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // The descriptor set, for the HTTP/JSON gateway's reflection-driven codec (src/gateway).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("etcd_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Keys and values are shared between the cache and every response: `Bytes` makes
        // that a reference-count bump instead of a copy.
        .bytes(".")
        // prost with etcd's wording of decode errors (src/codec.rs).
        .codec_path("crate::wire::grpc::codec::EtcdCodec")
        .compile_fds(fds)?;
    Ok(())
}
