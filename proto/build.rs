//! Compiles `proto/*.proto` with protox (pure Rust), so building needs no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/zhibo/v1/client.proto", "proto/zhibo/v1/bus.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // A whole Message inline would make SubscribeRoomOutput the largest `Packet` body, and every
        // packet (and every idle connection's future, which holds one) larger.
        .boxed(".zhibo.v1.SubscribeRoomOutput.pinned")
        // Likewise the conversation row (and its last message) in ConversationUpdate.
        .boxed(".zhibo.v1.ConversationUpdate.conversation")
        .boxed(".zhibo.v1.Conversation.last_message")
        .compile_fds(descriptors)?;
    Ok(())
}
