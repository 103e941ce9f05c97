//! Every message type a keywave process decodes from the bus, in both
//! encodings and with or without a schema header: decoding must return a
//! value or a typed error, never panic, hang or allocate without bound.
#![no_main]

use async_nats::HeaderMap;
use keywave_common::codec::{self, Format};
use keywave_common::detect::{Detection, RotatedNotice};
use keywave_common::wire::{CampaignEvent, CampaignSpec, Credential, RotationResult, RotationTask};
use libfuzzer_sys::fuzz_target;

fn headers(selector: u8) -> Option<HeaderMap> {
    match selector % 4 {
        0 => None,
        1 => Some(codec::headers(Format::MsgPack, "fuzz")),
        2 => Some(codec::headers(Format::Json, "fuzz")),
        _ => {
            let mut h = HeaderMap::new();
            h.insert("Content-Type", "application/msgpack");
            h.insert("Keywave-Schema", "99");
            Some(h)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let h = headers(selector);
    let h = h.as_ref();
    let _ = codec::decode::<RotationTask>(h, payload);
    let _ = codec::decode::<RotationResult>(h, payload);
    let _ = codec::decode::<CampaignEvent>(h, payload);
    let _ = codec::decode::<CampaignSpec>(h, payload);
    let _ = codec::decode::<Credential>(h, payload);
    let _ = codec::decode::<RotatedNotice>(h, payload);
    let _ = Detection::decode(h, payload);
    // A value that decodes must encode again (no state the encoder rejects).
    if let Ok(task) = codec::decode::<RotationTask>(h, payload) {
        codec::encode(Format::MsgPack, &task).expect("a decoded task re-encodes");
    }
});
