//! A group's message secrets, stored so that a message does not rewrite
//! the past epochs' secrets.
//!
//! openmls keeps the secrets to read a group's messages as one value: the
//! current epoch's secret tree, and for each of up to
//! [`MAX_PAST_EPOCHS`](super::MAX_PAST_EPOCHS) past epochs its secret tree
//! and member list (to read a message that was sent before a commit and
//! arrives after it). It hands the whole value to storage after every
//! message it sends or reads. Stored as one value, every message rewrote
//! every kept past epoch: in a 21-member group where everyone writes, a
//! past epoch is about 11 KB, so after 32 commits each message wrote
//! 370 KB to the database, growing with members times epochs.
//!
//! A past epoch changes only when a late message of that epoch is read.
//! So the value is stored in parts: a *head*, which is the value with its
//! list of past epochs replaced by their epoch numbers, and each past
//! epoch under its own key. Writing compares each past epoch with what is
//! stored and writes only those that changed. Reading puts the parts back
//! together, byte for byte the value openmls wrote.
//!
//! Values are MessagePack maps with named fields (see `storage`), so the
//! parts are cut out of the packed bytes without knowing openmls's types
//! beyond two field names. A value stored whole (before this, or by a
//! version of openmls whose field names differ) is read as it is.

use std::borrow::Cow;

use rmp::Marker;

/// openmls's field holding the past epochs (`MessageSecretsStore`).
const TREES: &str = "past_epoch_trees";
/// In a head, the field that replaces [`TREES`]: the past epochs' numbers.
const INDEX: &str = "past_epochs";
/// A past epoch's field holding its number (`EpochTree`).
const EPOCH: &str = "epoch";

/// Stored message secrets that cannot be taken apart or put together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored message secrets are malformed: {0}")]
pub struct Malformed(&'static str);

impl Malformed {
    /// A past epoch the head lists is not stored.
    pub const MISSING: Self = Self("a past epoch is missing");
}

/// Packed message secrets, taken apart.
#[derive(Debug, PartialEq, Eq)]
pub struct Parts<'a> {
    /// The value with its past epochs replaced by their numbers.
    pub head: Vec<u8>,
    /// Each past epoch: its number and its packed bytes, in order.
    pub epochs: Vec<(u64, &'a [u8])>,
}

/// Takes packed message secrets apart. `None` if the value has no list of
/// past epochs (not the shape this module knows): it is stored whole.
/// One pass over the bytes: openmls hands them over after every message.
pub fn split(packed: &[u8]) -> Result<Option<Parts<'_>>, Malformed> {
    let mut rest = packed;
    let len = rmp::decode::read_map_len(&mut rest).map_err(|_| Malformed("not a map"))?;
    let mut at = packed.len() - rest.len();
    let mut head = Vec::with_capacity(256);
    write_map_len(&mut head, len as usize)?;
    let mut epochs = None;
    for _ in 0..len {
        let entry = at;
        let (name, value_at) = field_name(packed, at)?;
        if name == TREES && epochs.is_none() {
            let (items, end) = array_items(packed, value_at)?;
            let mut found: Vec<(u64, &[u8])> = Vec::with_capacity(items.len());
            for tree in items {
                // Not the shape this module knows: stored whole.
                let Some(number) = field(tree, EPOCH)? else {
                    return Ok(None);
                };
                let number = read_u64(number)?;
                if found.iter().any(|(n, _)| *n == number) {
                    return Ok(None);
                }
                found.push((number, tree));
            }
            write_str(&mut head, INDEX)?;
            write_array_len(&mut head, found.len())?;
            for (number, _) in &found {
                rmp::encode::write_uint(&mut head, *number).map_err(|_| ENCODE)?;
            }
            epochs = Some(found);
            at = end;
        } else {
            at = skip(packed, value_at)?;
            head.extend_from_slice(&packed[entry..at]);
        }
    }
    if at != packed.len() {
        return Err(Malformed("bytes after the map"));
    }
    Ok(epochs.map(|epochs| Parts { head, epochs }))
}

/// The past epochs a head lists; `None` for a value stored whole.
pub fn listed(head: &[u8]) -> Result<Option<Vec<u64>>, Malformed> {
    // Read up to the list only: the current epoch's secrets may follow.
    let Some(index) = field(head, INDEX)? else {
        return Ok(None);
    };
    items(index)?
        .into_iter()
        .map(read_u64)
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Puts stored message secrets back together: `head` with each listed
/// past epoch's bytes, which `epoch` reads. A value stored whole comes
/// back as it is.
pub fn join<'h, E>(
    head: &'h [u8],
    mut epoch: impl FnMut(u64) -> Result<Vec<u8>, E>,
) -> Result<Cow<'h, [u8]>, E>
where
    E: From<Malformed>,
{
    let fields = map_fields(head)?;
    let Some(index) = fields.iter().find(|f| f.name == INDEX) else {
        return Ok(Cow::Borrowed(head));
    };
    let numbers = items(&head[index.value.clone()])?;
    let mut whole = Vec::with_capacity(head.len());
    write_map_len(&mut whole, fields.len())?;
    for f in &fields {
        if f.name == INDEX {
            write_str(&mut whole, TREES)?;
            write_array_len(&mut whole, numbers.len())?;
            for number in &numbers {
                whole.extend_from_slice(&epoch(read_u64(number)?)?);
            }
        } else {
            whole.extend_from_slice(&head[f.whole.clone()]);
        }
    }
    Ok(Cow::Owned(whole))
}

const ENCODE: Malformed = Malformed("could not be encoded");

/// One field of a packed map: its name, and where its value and the whole
/// entry (name and value) lie.
struct Field<'a> {
    name: &'a str,
    value: std::ops::Range<usize>,
    whole: std::ops::Range<usize>,
}

/// A field name (a packed string) at `at`, and where its value starts.
fn field_name(bytes: &[u8], at: usize) -> Result<(&str, usize), Malformed> {
    let (name, after) = rmp::decode::read_str_from_slice(bytes.get(at..).unwrap_or_default())
        .map_err(|_| Malformed("a field name is not a string"))?;
    Ok((name, bytes.len() - after.len()))
}

/// The fields of a packed map with string keys, which must fill `bytes`.
fn map_fields(bytes: &[u8]) -> Result<Vec<Field<'_>>, Malformed> {
    let mut rest = bytes;
    let len = rmp::decode::read_map_len(&mut rest).map_err(|_| Malformed("not a map"))?;
    let mut at = bytes.len() - rest.len();
    // Each entry takes at least two bytes: no allocation beyond the input.
    let mut fields = Vec::with_capacity((len as usize).min(bytes.len() / 2));
    for _ in 0..len {
        let (name, value_at) = field_name(bytes, at)?;
        let end = skip(bytes, value_at)?;
        fields.push(Field {
            name,
            value: value_at..end,
            whole: at..end,
        });
        at = end;
    }
    if at != bytes.len() {
        return Err(Malformed("bytes after the map"));
    }
    Ok(fields)
}

/// The value of the field `name` of a packed map, reading no further
/// than that field; `None` if the map has no such field.
fn field<'a>(map: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, Malformed> {
    let mut rest = map;
    let len = rmp::decode::read_map_len(&mut rest).map_err(|_| Malformed("not a map"))?;
    let mut at = map.len() - rest.len();
    for _ in 0..len {
        let (found, value_at) = field_name(map, at)?;
        at = skip(map, value_at)?;
        if found == name {
            return Ok(Some(&map[value_at..at]));
        }
    }
    Ok(None)
}

/// The items of the packed array at `at`, and where it ends.
fn array_items(bytes: &[u8], at: usize) -> Result<(Vec<&[u8]>, usize), Malformed> {
    let mut rest = bytes.get(at..).unwrap_or_default();
    let len = rmp::decode::read_array_len(&mut rest).map_err(|_| Malformed("not a list"))?;
    let mut at = bytes.len() - rest.len();
    let mut items = Vec::with_capacity((len as usize).min(rest.len()));
    for _ in 0..len {
        let end = skip(bytes, at)?;
        items.push(&bytes[at..end]);
        at = end;
    }
    Ok((items, at))
}

/// The items of a packed array, which must fill `bytes`.
fn items(bytes: &[u8]) -> Result<Vec<&[u8]>, Malformed> {
    let (items, end) = array_items(bytes, 0)?;
    if end != bytes.len() {
        return Err(Malformed("bytes after the list"));
    }
    Ok(items)
}

/// A packed unsigned integer that fills `bytes`.
fn read_u64(bytes: &[u8]) -> Result<u64, Malformed> {
    let mut rest = bytes;
    let n = rmp::decode::read_int(&mut rest).map_err(|_| Malformed("an epoch is not a number"))?;
    if !rest.is_empty() {
        return Err(Malformed("bytes after a number"));
    }
    Ok(n)
}

/// Where the packed value that starts at `at` ends. Iterative, so a deep
/// nesting cannot exhaust the stack.
fn skip(bytes: &[u8], mut at: usize) -> Result<usize, Malformed> {
    const SHORT: Malformed = Malformed("cut short");
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let byte = *bytes.get(at).ok_or(SHORT)?;
        // Most of it is byte strings packed as lists of small numbers.
        if byte < 0x80 {
            at += 1;
            continue;
        }
        if byte == 0xcc && at + 2 <= bytes.len() {
            at += 2;
            continue;
        }
        let marker = Marker::from_u8(byte);
        at += 1;
        // Bytes of a big-endian length of `n` bytes at `at`.
        let len = |at: usize, n: usize| -> Result<usize, Malformed> {
            let field = bytes.get(at..at + n).ok_or(SHORT)?;
            Ok(field
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)))
        };
        // (bytes of payload that follow, values nested in it)
        let (payload, nested): (usize, u64) = match marker {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(n) => (usize::from(n), 0),
            Marker::Str8 | Marker::Bin8 => (len(at, 1)?.checked_add(1).ok_or(SHORT)?, 0),
            Marker::Str16 | Marker::Bin16 => (len(at, 2)?.checked_add(2).ok_or(SHORT)?, 0),
            Marker::Str32 | Marker::Bin32 => (len(at, 4)?.checked_add(4).ok_or(SHORT)?, 0),
            Marker::FixExt1 => (2, 0),
            Marker::FixExt2 => (3, 0),
            Marker::FixExt4 => (5, 0),
            Marker::FixExt8 => (9, 0),
            Marker::FixExt16 => (17, 0),
            Marker::Ext8 => (len(at, 1)?.checked_add(2).ok_or(SHORT)?, 0),
            Marker::Ext16 => (len(at, 2)?.checked_add(3).ok_or(SHORT)?, 0),
            Marker::Ext32 => (len(at, 4)?.checked_add(5).ok_or(SHORT)?, 0),
            Marker::FixArray(n) => (0, u64::from(n)),
            Marker::Array16 => (2, len(at, 2)? as u64),
            Marker::Array32 => (4, len(at, 4)? as u64),
            Marker::FixMap(n) => (0, 2 * u64::from(n)),
            Marker::Map16 => (2, 2 * len(at, 2)? as u64),
            Marker::Map32 => (4, 2 * len(at, 4)? as u64),
            Marker::Reserved => return Err(Malformed("a byte MessagePack never uses")),
        };
        at = at.checked_add(payload).ok_or(SHORT)?;
        if at > bytes.len() {
            return Err(SHORT);
        }
        // Every nested value takes at least a byte.
        pending = pending
            .checked_add(nested)
            .filter(|p| *p <= (bytes.len() - at) as u64)
            .ok_or(SHORT)?;
    }
    Ok(at)
}

fn write_map_len(out: &mut Vec<u8>, len: usize) -> Result<(), Malformed> {
    let len = u32::try_from(len).map_err(|_| ENCODE)?;
    rmp::encode::write_map_len(out, len).map_err(|_| ENCODE)?;
    Ok(())
}

fn write_array_len(out: &mut Vec<u8>, len: usize) -> Result<(), Malformed> {
    let len = u32::try_from(len).map_err(|_| ENCODE)?;
    rmp::encode::write_array_len(out, len).map_err(|_| ENCODE)?;
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) -> Result<(), Malformed> {
    rmp::encode::write_str(out, s).map_err(|_| ENCODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// The shape of openmls's value, as far as this module reads it.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Store {
        max_epochs: usize,
        past_epoch_trees: Vec<Tree>,
        message_secrets: Vec<u8>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Tree {
        epoch: u64,
        secrets: Vec<Option<Vec<u8>>>,
        leaves: Vec<(String, f64, i64)>,
    }

    fn packed<V: Serialize>(v: &V) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    fn store(epochs: std::ops::Range<u64>) -> Store {
        Store {
            max_epochs: 32,
            past_epoch_trees: epochs
                .map(|e| Tree {
                    epoch: e * 1_000_000_007,
                    secrets: vec![Some(vec![e as u8; 40]), None, Some(vec![200; 70_000])],
                    leaves: vec![("x".repeat(300), -1.5, -70_000), ("é".into(), 0.0, 1)],
                })
                .collect(),
            message_secrets: vec![7; 33],
        }
    }

    /// Taken apart and put together, the bytes are the ones openmls wrote.
    #[test]
    fn parts_join_back_to_the_same_bytes() {
        for epochs in [0..0, 3..4, 1..33] {
            let value = store(epochs.clone());
            let bytes = packed(&value);
            let parts = split(&bytes).unwrap().unwrap();
            let numbers: Vec<u64> = parts.epochs.iter().map(|(n, _)| *n).collect();
            let expected: Vec<u64> = epochs.map(|e| e * 1_000_000_007).collect();
            assert_eq!(numbers, expected);
            assert_eq!(listed(&parts.head).unwrap(), Some(expected));
            assert!(
                parts.head.len() < 100 + 9 * parts.epochs.len(),
                "the head holds no past epoch"
            );
            let joined = join(&parts.head, |n| {
                let (_, tree) = parts.epochs.iter().find(|(e, _)| *e == n).unwrap();
                Ok::<_, Malformed>(tree.to_vec())
            })
            .unwrap();
            assert_eq!(&*joined, &bytes[..]);
            let back: Store = rmp_serde::from_slice(&joined).unwrap();
            assert_eq!(back, value);
        }
    }

    /// A value stored whole, or of another shape, is read as it is.
    #[test]
    fn a_value_stored_whole_is_read_as_it_is() {
        let bytes = packed(&store(0..2));
        assert_eq!(listed(&bytes).unwrap(), None);
        let joined = join(&bytes, |_| -> Result<Vec<u8>, Malformed> {
            panic!("no parts")
        });
        assert!(matches!(joined, Ok(Cow::Borrowed(b)) if b == &bytes[..]));
        let other = packed(&Tree {
            epoch: 1,
            secrets: vec![],
            leaves: vec![],
        });
        assert_eq!(split(&other).unwrap(), None);
    }

    /// Damaged bytes are an error, never a panic or a huge allocation; a
    /// missing part is the reader's error.
    #[test]
    fn damaged_values_are_errors() {
        let bytes = packed(&store(0..3));
        let parts = split(&bytes).unwrap().unwrap();
        for cut in 0..bytes.len().min(400) {
            assert!(split(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // The list is read without what follows it: a head cut after it
        // still lists it whole (what follows fails when the value is read).
        let whole_list = listed(&parts.head).unwrap();
        for cut in 0..parts.head.len() {
            match listed(&parts.head[..cut]) {
                Err(_) => {}
                Ok(list) => assert_eq!(list, whole_list, "cut at {cut}"),
            }
        }
        assert!(listed(&parts.head[..12]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(split(&longer).is_err());
        // A list that claims four billion items, in a few bytes.
        assert!(skip(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x00], 0).is_err());
        assert!(skip(&[0xdf, 0xff, 0xff, 0xff, 0xff], 0).is_err());
        assert!(skip(&[0xc1], 0).is_err());
        assert!(skip(&[0xcc], 0).is_err());
        assert!(skip(&[0x92, 0x01, 0xcc], 0).is_err());
        assert!(skip(&[0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2], 0).is_err());
        // Deep nesting.
        let deep = [vec![0x91; 1_000_000], vec![0xc0]].concat();
        assert_eq!(skip(&deep, 0), Ok(deep.len()));
        // Two past epochs with one number: not the shape known, stored whole.
        let mut twice = store(0..2);
        twice.past_epoch_trees[1].epoch = twice.past_epoch_trees[0].epoch;
        assert_eq!(split(&packed(&twice)), Ok(None));
        // A part that cannot be read.
        let missing = join(&parts.head, |_| Err(Malformed("gone")));
        assert_eq!(missing, Err(Malformed("gone")));
    }
}
