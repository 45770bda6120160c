//! The transaction log's record decoder (`txlog/src/codec.rs`).
//!
//! Properties: a payload that decodes has a format version this build reads, and re-encodes to a record that decodes equal, and encoding is
//! canonical (encoding the decoded record twice gives the same bytes); a payload that does not
//! decode is a typed error.
#![no_main]

use causeway_txlog::codec::{decode, encode, TRANSACTION_FORMAT_VERSION};
use causeway_txlog::Error;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(tx) => {
            // Older formats this build still reads decode too; only the current one is written.
            assert!(causeway_proto::v1::transaction_format_supported(
                tx.format_version
            ));
            let bytes = if tx.format_version == TRANSACTION_FORMAT_VERSION {
                encode(&tx)
            } else {
                tx.encode_to_vec().into()
            };
            let again = decode(&bytes).expect("a re-encoded record decodes");
            assert_eq!(again, tx);
            assert_eq!(again.encode_to_vec(), bytes, "encoding is not canonical");
        }
        Err(Error::Decode(_)) | Err(Error::UnknownFormatVersion { .. }) => {}
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
});
