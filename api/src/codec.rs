//! The protobuf codec of the Workload API (its generated client and server use it through
//! `codec_path`): tonic's prost codec gives every call an 8 KiB encode buffer up front; this
//! one starts at 64 bytes and reserves exactly what each message needs. (The agent's watch
//! streams, thousands of them long-lived, do not encode per stream at all: they send one
//! shared frame per selector set, see the agent's `workload` module.) The wire format is
//! protobuf's, unchanged. No I/O.

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};

/// Bytes a response stream gathers before handing them to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Initial encode buffer: the message's own size is reserved when it is encoded.
const ENCODE_BUFFER: usize = 64;

/// Initial decode buffer: Workload API requests are a few hundred bytes at most.
const DECODE_BUFFER: usize = 1024;

/// A prost codec whose encode buffers are sized to each message.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LeanEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LeanEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
            DECODE_BUFFER,
            YIELD_THRESHOLD,
        ))
    }
}

/// Encodes a message into exactly the room it needs.
#[derive(Debug, Clone)]
pub struct LeanEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for LeanEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode the message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Not zero: tonic grows compression buffers in steps of this size.
        BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD)
    }
}
