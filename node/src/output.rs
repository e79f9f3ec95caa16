//! Human-readable output of the control API's answers. `--json` bypasses
//! all of this and prints the answer itself.

use serde_json::Value;

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `text` and spaces to fill `width` terminal columns: an emoji or a CJK
/// character takes two, which `{:<width$}` (counting chars) gets wrong.
fn padded(text: &str, width: usize) -> String {
    let used = unicode_width::UnicodeWidthStr::width(text);
    format!("{text}{}", " ".repeat(width.saturating_sub(used)))
}

/// Indent of a message's second and later lines.
const CONTINUATION: &str = "    ";

/// A message's text as it may reach a terminal. Its author chose every
/// character, so none may act on the terminal or pass for our own output:
/// control characters (escape sequences, carriage returns) and the Unicode
/// controls that reorder text are shown escaped (`\u{1b}`), and every line
/// after the first is indented, so it cannot pose as another message.
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
            out.push_str(CONTINUATION);
        }
        for c in line.chars() {
            let reorders = matches!(
                c,
                '\u{202a}'..='\u{202e}'
                    | '\u{2066}'..='\u{2069}'
                    | '\u{200e}'
                    | '\u{200f}'
                    | '\u{061c}'
            );
            if (c.is_control() && c != '\t') || reorders {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
    }
    out
}

/// "2026-11-26T13:45:12.345Z" → "2026-11-26 13:45:12".
fn short_time(rfc3339: &str) -> String {
    rfc3339.get(..19).unwrap_or(rfc3339).replace('T', " ")
}

pub fn contacts(list: &Value) -> String {
    let Some(items) = list.as_array() else {
        return String::new();
    };
    if items.is_empty() {
        return "No contacts yet. Invite someone with `protonode invite`, or accept their ticket with `protonode accept TICKET`.\n".into();
    }
    let name_of = |c: &Value| {
        let mut name = s(c, "name").to_string();
        if let Some(p) = c.get("picture").and_then(Value::as_str) {
            name = format!("{p} {name}");
        }
        if let Some(p) = c.get("pronouns").and_then(Value::as_str) {
            name = format!("{name} ({p})");
        }
        shown(&name)
    };
    // As wide as the widest name (a name may have 64 characters).
    let width = items
        .iter()
        .map(|c| unicode_width::UnicodeWidthStr::width(name_of(c).as_str()))
        .max()
        .unwrap_or(0)
        .max(24);
    let mut out = format!(
        "{:<16}  {}  {:<8}  {:<19}  {:<19}  {}\n",
        "ID",
        padded("NAME", width),
        "STATE",
        "SINCE",
        "FINGERPRINT",
        "INTRODUCED BY"
    );
    for c in items {
        let name = name_of(c);
        let mut state = s(c, "state").to_string();
        if c.get("retired") == Some(&Value::Bool(true)) {
            state = "retired".into();
        }
        if s(c, "trust") == "flagged" {
            state = "FLAGGED".into();
        }
        out += &format!(
            "{:<16}  {}  {:<8}  {:<19}  {:<19}  {}\n",
            s(c, "id"),
            padded(&name, width),
            state,
            short_time(s(c, "since")),
            s(c, "fingerprint"),
            c.get("introduced_by")
                .and_then(Value::as_str)
                .unwrap_or("-"),
        );
        if let Some(into) = c.get("merged_into").and_then(Value::as_str) {
            out += &format!("{:<16}  merged into {into}\n", "");
        }
        if let Some(reason) = c.get("reason").and_then(Value::as_str) {
            out += &format!("{:<16}  do not trust: {reason}\n", "");
        }
    }
    out
}

/// The strings of the list at `key` (none if it is missing).
fn strings<'a>(v: &'a Value, key: &str) -> Vec<&'a str> {
    v.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// One contact's trust record.
pub fn trust_record(v: &Value) -> String {
    let c = v.get("contact").unwrap_or(&Value::Null);
    let mut out = format!("{} ({})\n", s(c, "name"), s(c, "id"));
    let state = match c.get("merged_into").and_then(Value::as_str) {
        Some(into) => format!("retired: merged into {into}"),
        None => s(c, "state").to_string(),
    };
    out += &format!("  state:        {state}\n");
    out += &format!("  their key:    {}\n", s(c, "fingerprint"));
    out += &format!("  our key:      {}\n", s(v, "own_fingerprint"));
    out += &format!("  obtained:     {}\n", s(v, "obtained"));
    let vouched = strings(v, "vouched_by");
    out += &format!(
        "  vouched by:   {}\n",
        if vouched.is_empty() {
            "nobody else (you met directly)".to_string()
        } else {
            vouched.join(", ")
        }
    );
    let aliases = strings(v, "may_be_alias_of");
    if !aliases.is_empty() {
        out += &format!(
            "  caution:      only the word of {} says this is {}: it may be an alias of theirs\n                until you verify (`protonode group verify` once you have checked their key id\n                with them, or a ticket exchanged directly, then `protonode merge`)\n",
            aliases.join(" and "),
            s(c, "name")
        );
    }
    let verified = strings(v, "verified_in");
    if !verified.is_empty() {
        out += &format!(
            "  verified:     you checked their key out of band (group {})\n",
            verified.join(", ")
        );
    }
    out += &format!("  trust:        {}\n", s(c, "trust"));
    if let Some(reason) = c.get("reason").and_then(Value::as_str) {
        out += &format!("  reason:       {reason}\n");
    }
    if let Some(into) = c.get("merged_into").and_then(Value::as_str) {
        out += &format!("  merged into:  {into}\n");
    }
    for a in v
        .get("attestations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let how = if s(a, "kind") == "follows" {
            "is followed by"
        } else {
            "is equivalent to"
        };
        // Whose keys it links: the contact's key here, or ours.
        let key = |k: &str| -> String {
            if k == s(c, "fingerprint") {
                format!("{k} (their key)")
            } else if k == s(v, "own_fingerprint") {
                format!("{k} (our key)")
            } else {
                k.to_string()
            }
        };
        out += &format!(
            "  attestation:  {} {how} {} ({})\n",
            key(s(a, "first")),
            key(s(a, "second")),
            short_time(s(a, "at"))
        );
    }
    out
}

/// Merge requests, sent and received.
pub fn merges(list: &Value) -> String {
    let Some(items) = list.as_array() else {
        return String::new();
    };
    if items.is_empty() {
        return "No merge requests.\n".into();
    }
    let mut out = format!(
        "{:<32}  {:<9}  {:<8}  {:<8}  {:<16}  {}\n",
        "ID", "DIRECTION", "KIND", "STATE", "NAME", "CONTACTS"
    );
    for m in items {
        out += &format!(
            "{:<32}  {:<9}  {:<8}  {:<8}  {}  {}\n",
            s(m, "id"),
            s(m, "direction"),
            s(m, "kind"),
            s(m, "state"),
            padded(&shown(s(m, "name")), 16),
            m.get("contacts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        );
        if let Some(reason) = m.get("reason").and_then(Value::as_str) {
            out += &format!("{:<32}  {reason}\n", "");
        }
    }
    out
}

/// A conversation; `contacts` (the `contacts` answer) names the authors.
pub fn history(list: &Value, contacts: &Value) -> String {
    let Some(items) = list.as_array() else {
        return String::new();
    };
    if items.is_empty() {
        return "No messages yet.\n".into();
    }
    let name_of = |id: &str| {
        contacts
            .as_array()
            .and_then(|cs| cs.iter().find(|c| s(c, "id") == id))
            .map(|c| s(c, "name").to_string())
            .unwrap_or_else(|| id.to_string())
    };
    let mut out = String::new();
    for m in items {
        let from = match (s(m, "from"), m.get("name").and_then(Value::as_str)) {
            ("me", _) => "me".to_string(),
            (_, Some(_)) => author(m),
            (id, None) => name_of(id),
        };
        let status = match s(m, "status") {
            "received" => String::new(),
            other => format!("  [{other}]"),
        };
        out += &format!(
            "{}  {}: {}{}\n",
            short_time(s(m, "at")),
            shown(&from),
            shown(s(m, "text")),
            status
        );
    }
    out
}

/// Whether a member of group `g` other than us and our own placeholders
/// goes by `name`: someone we add under that name may already be in the
/// group, added by someone else (no one can tell from a name).
pub fn has_namesake(g: &Value, name: &str) -> bool {
    let name = name.trim().to_lowercase();
    g.get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| s(m, "status") != "self")
        .filter(|m| m.get("introduced_by_me") != Some(&Value::Bool(true)))
        .any(|m| s(m, "name").trim().to_lowercase() == name)
}

/// A name that two of the others in group `g` go by (case aside), if any:
/// two of one's contacts put in one group may be one person.
pub fn shared_name(g: &Value) -> Option<String> {
    let names: Vec<(String, &str)> = g
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| s(m, "status") != "self")
        .map(|m| (s(m, "name").trim().to_lowercase(), s(m, "name")))
        .collect();
    names
        .iter()
        .enumerate()
        .find(|(i, (n, _))| names[i + 1..].iter().any(|(m, _)| m == n))
        .map(|(_, (_, name))| name.to_string())
}

/// Groups with their rosters.
pub fn groups(list: &Value) -> String {
    let Some(items) = list.as_array() else {
        return String::new();
    };
    if items.is_empty() {
        return "No groups. Introduce two contacts with `protonode introduce A B`, or `protonode group create NAME CONTACT...`; `protonode groups --all` also lists groups you left.\n".into();
    }
    let mut out = String::new();
    for g in items {
        let name = g
            .get("name")
            .and_then(Value::as_str)
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default();
        let state = if g["claiming"] == Value::Bool(true) {
            "claim sent: waiting for the group to order it".to_string()
        } else if g["pending"] == Value::Bool(true) {
            "pending: `protonode claim` or `protonode decline`".to_string()
        } else if s(g, "state") == "gone" {
            "gone: you are no longer in it; `protonode history` still shows it".to_string()
        } else {
            match g.get("queued_changes").and_then(Value::as_u64).unwrap_or(0) {
                0 => s(g, "state").to_string(),
                1 => format!("{}, 1 change not yet ordered", s(g, "state")),
                n => format!("{}, {n} changes not yet ordered", s(g, "state")),
            }
        };
        out += &format!(
            "group {}{}  epoch {}  ({})\n",
            s(g, "id"),
            name,
            g.get("epoch").and_then(Value::as_u64).unwrap_or(0),
            state
        );
        for m in g
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let by = m.get("introduced_by").and_then(Value::as_str);
            let by_me = m.get("introduced_by_me") == Some(&Value::Bool(true));
            // A placeholder is its introducer's word, and maybe its key.
            let by = match (s(m, "status"), by) {
                ("placeholder", _) if by_me => "  (as asserted by you, who hold its key)".into(),
                ("placeholder", Some(b)) => {
                    format!("  (as asserted by {}, who may hold its key)", shown(b))
                }
                (_, Some(b)) => format!("  (introduced by {})", shown(b)),
                (_, None) => String::new(),
            };
            out += &format!(
                "  {:<20}  {}  {:<11}{}\n",
                s(m, "id"),
                padded(&shown(s(m, "name")), 24),
                s(m, "status"),
                by
            );
        }
    }
    out
}

pub fn status(v: &Value) -> String {
    let mut out = format!("peer id:   {}\n", s(v, "peer_id"));
    for a in v
        .get("listen")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out += &format!("listening: {}\n", a.as_str().unwrap_or(""));
    }
    let peers = v.get("peers").and_then(Value::as_array).map_or(0, Vec::len);
    out += &format!("connected: {peers} peer(s)\n");
    out += &format!(
        "contacts:  {}\n",
        v.get("contacts").and_then(Value::as_u64).unwrap_or(0)
    );
    out += &format!(
        "outbox:    {} waiting\n",
        v.get("outbox").and_then(Value::as_u64).unwrap_or(0)
    );
    for w in v
        .get("warnings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out += &format!("warning:   {}\n", w.as_str().unwrap_or(""));
    }
    out
}

/// An event in words; empty for one that says nothing new to a person.
pub fn event(e: &Value) -> String {
    match s(e, "event") {
        "message" => {
            let m = e.get("message").unwrap_or(&Value::Null);
            let group = (s(e, "kind") == "group").then(|| conversation(e));
            format!(
                "{}  {}{}: {}",
                short_time(s(m, "at")),
                shown(&author(m)),
                group
                    .map(|g| format!(" in {}", shown(&g)))
                    .unwrap_or_default(),
                shown(s(m, "text"))
            )
        }
        "group" => {
            let (id, group) = (s(e, "group"), group_label(e));
            match s(e, "change") {
                "introduced" => {
                    let others: Vec<String> = e
                        .get("joined")
                        .and_then(Value::as_array)
                        .map(|l| l.iter().filter_map(Value::as_str).map(shown).collect())
                        .unwrap_or_default();
                    let to = match others.as_slice() {
                        [] => String::new(),
                        [one] => format!(" to {one}"),
                        [first @ .., last] if first.len() < 4 => {
                            format!(" to {} and {last}", first.join(", "))
                        }
                        many => {
                            format!(" to {} and {} others", many[..3].join(", "), many.len() - 3)
                        }
                    };
                    format!(
                        "{} introduced you{to} in {group}: `protonode claim {id}` joins it as yourself, `protonode decline {id}` declines",
                        s(e, "introduced_by")
                    )
                }
                "joined" => format!("You made {group}."),
                "entered" => format!(
                    "Your claim is ordered: you are in the {group} under your own key (epoch {}).",
                    e.get("epoch").and_then(Value::as_u64).unwrap_or(0)
                ),
                "left" => match e.get("removed_by").and_then(Value::as_str) {
                    Some(by) => format!(
                        "{by} removed you from {group}; `protonode history {id}` still reads it."
                    ),
                    None => format!(
                        "You are no longer in {group}; `protonode history {id}` still reads it."
                    ),
                },
                _ => {
                    let epoch = e.get("epoch").and_then(Value::as_u64).unwrap_or(0);
                    let names = |key: &str| {
                        e.get(key)
                            .and_then(Value::as_array)
                            .map(|l| {
                                l.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            })
                            .filter(|l| !l.is_empty())
                    };
                    let list = |key: &str| -> Vec<&Value> {
                        e.get(key)
                            .and_then(Value::as_array)
                            .map(|l| l.iter().collect())
                            .unwrap_or_default()
                    };
                    let removals = list("removed");
                    let told: Vec<&str> = list("left")
                        .into_iter()
                        .chain(removals.iter().map(|r| &r["member"]))
                        .filter_map(Value::as_str)
                        .collect();
                    // Departures a node of an older version ordered: who went, not how.
                    let untold: Vec<&str> = list("gone")
                        .into_iter()
                        .filter_map(Value::as_str)
                        .filter(|n| !told.contains(n))
                        .collect();
                    // Who rotated their keys: the others, then us ("me").
                    let rotated = |ours: bool| {
                        let who: Vec<&str> = list("updated")
                            .into_iter()
                            .filter_map(Value::as_str)
                            .filter(|n| (*n == "me") == ours)
                            .collect();
                        match (who.is_empty(), ours) {
                            (true, _) => None,
                            (false, true) => Some("you rotated your keys".to_string()),
                            (false, false) => {
                                Some(format!("{} rotated their keys", who.join(", ")))
                            }
                        }
                    };
                    let said: Vec<String> = [
                        names("claimed").map(|n| format!("{n} claimed their place")),
                        names("joined").map(|n| format!("{n} joined (until claimed, as asserted by whoever added them)")),
                        names("left").map(|n| format!("{n} left")),
                        rotated(false),
                        rotated(true),
                    ]
                    .into_iter()
                    .flatten()
                    .chain(removals.iter().map(|r| {
                        let by = match s(r, "by") {
                            "me" => "you",
                            by => by,
                        };
                        if r["declined"] == true {
                            format!("{} declined; {by} removed the placeholder", s(r, "member"))
                        } else if r["placeholder"] == true {
                            format!(
                                "{}'s placeholder was removed by {by} (they declined, or {by} withdrew it)",
                                s(r, "member")
                            )
                        } else {
                            format!("{by} removed {}", s(r, "member"))
                        }
                    }))
                    .chain((!untold.is_empty()).then(|| {
                        let were = if untold.len() > 1 { "were" } else { "was" };
                        format!("{} left or {were} removed", untold.join(", "))
                    }))
                    .collect();
                    if said.is_empty() {
                        format!("The {group} changed (epoch {epoch}): `protonode groups` shows its members.")
                    } else {
                        format!("In the {group}: {} (epoch {epoch}).", said.join("; "))
                    }
                }
            }
        }
        "delivery" => match (s(e, "kind"), e.get("member").and_then(Value::as_str)) {
            // `accept` already said that its answer was taken.
            ("answer", _) if s(e, "status") == "delivered" => String::new(),
            ("answer", _) => format!(
                "your answer to an invitation was refused (contact {}): ask for a new ticket",
                s(e, "conversation")
            ),
            (_, Some(member)) => {
                let name = e
                    .get("member_name")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("member {member}"), str::to_string);
                match e.get("asserted_by").and_then(Value::as_str) {
                    Some(by) => format!(
                        "message {} {} at the node of {name} (as asserted by {by})",
                        s(e, "message"),
                        s(e, "status"),
                    ),
                    None => format!(
                        "message {} {} at {name}'s node",
                        s(e, "message"),
                        s(e, "status")
                    ),
                }
            }
            _ => match e.get("contact_name").and_then(Value::as_str) {
                Some(name) if s(e, "status") == "delivered" => format!(
                    "message {} delivered to {}'s node",
                    s(e, "message"),
                    shown(name)
                ),
                Some(name) => format!(
                    "message {} {} (to {})",
                    s(e, "message"),
                    s(e, "status"),
                    shown(name)
                ),
                None => format!("message {} {}", s(e, "message"), s(e, "status")),
            },
        },
        "contact" => {
            let c = e.get("contact").unwrap_or(&Value::Null);
            format!(
                "contact {} ({}): {}",
                s(c, "name"),
                s(c, "id"),
                s(e, "change")
            )
        }
        "merge" => {
            let m = e.get("merge").unwrap_or(&Value::Null);
            match s(m, "state") {
                "flagged" => format!(
                    "WARNING: a merge request from {} revealed a meddler: {}",
                    s(m, "name"),
                    s(m, "reason")
                ),
                _ => format!(
                    "{} asks to merge two relationships into one: `protonode merge accept {}` or `protonode merge ignore {}`",
                    s(m, "name"),
                    s(m, "id"),
                    s(m, "id")
                ),
            }
        }
        "lagged" => format!(
            "(missed {} events; `protonode history` has everything)",
            e.get("missed").and_then(Value::as_u64).unwrap_or(0)
        ),
        _ => e.to_string(),
    }
}

/// A message's author: its name if the node knows it, and who asserts it
/// for a placeholder.
fn author(m: &Value) -> String {
    let who = match m.get("name").and_then(Value::as_str) {
        Some(name) => name,
        None => s(m, "from"),
    };
    match m.get("asserted_by").and_then(Value::as_str) {
        Some(by) => format!("{who} (as asserted by {by})"),
        None => who.to_string(),
    }
}

/// A message event's group, by its name if it has one.
fn conversation(e: &Value) -> String {
    match e.get("conversation_name").and_then(Value::as_str) {
        Some(name) => format!("group \"{name}\""),
        None => format!("group {}", s(e, "conversation")),
    }
}

/// A group event's group, by its name if it has one.
fn group_label(e: &Value) -> String {
    match e.get("name").and_then(Value::as_str) {
        Some(name) => format!("group \"{name}\" ({})", s(e, "group")),
        None => format!("group {}", s(e, "group")),
    }
}

/// How many columns [`qr`] draws a ticket's code in (quiet zone included).
pub fn qr_width(ticket: &str) -> Result<usize, qrcode::types::QrError> {
    let code = qrcode::QrCode::with_error_correction_level(ticket.as_bytes(), qrcode::EcLevel::L)?;
    Ok(code.width() + 8)
}

/// A ticket as a QR code drawn with Unicode half blocks. With `paint` (a
/// terminal), in black on white whatever the terminal's colours, as a
/// scanner expects; else light on dark (for the usual dark terminal).
pub fn qr(ticket: &str, paint: bool) -> Result<String, qrcode::types::QrError> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::with_error_correction_level(ticket.as_bytes(), qrcode::EcLevel::L)?;
    let (dark, light) = if paint {
        (Dense1x2::Dark, Dense1x2::Light)
    } else {
        (Dense1x2::Light, Dense1x2::Dark)
    };
    let drawn = code
        .render::<Dense1x2>()
        .dark_color(dark)
        .light_color(light)
        .quiet_zone(true)
        .build();
    if !paint {
        return Ok(drawn);
    }
    // Black foreground on bright white, reset at each line's end.
    Ok(drawn
        .lines()
        .map(|line| format!("\x1b[30;107m{line}\x1b[0m"))
        .collect::<Vec<_>>()
        .join("\n"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn two_others_of_one_name_are_pointed_out() {
        let g = json!({"members": [
            {"name": "Alex", "status": "self"},
            {"name": "Blair", "status": "placeholder"},
            {"name": "blair ", "status": "placeholder"}]});
        assert_eq!(shared_name(&g).as_deref(), Some("Blair"));
        let g = json!({"members": [
            {"name": "Alex", "status": "self"},
            {"name": "alex", "status": "placeholder"},
            {"name": "Blair", "status": "placeholder"}]});
        assert_eq!(shared_name(&g), None, "our own name does not count");
    }

    #[test]
    fn a_member_named_like_the_one_we_add_is_pointed_out() {
        let g = json!({"members": [
            {"id": "a", "name": "Fay", "status": "self"},
            {"id": "b", "name": "Oli", "status": "claimed", "introduced_by": "Eve"},
            {"id": "c", "name": "oli", "status": "placeholder", "introduced_by": "me",
             "introduced_by_me": true},
            {"id": "d", "name": "Eve", "status": "placeholder", "introduced_by": "Gus"},
            {"id": "e", "name": "Kim", "status": "placeholder", "introduced_by": "me",
             "introduced_by_me": true},
        ]});
        assert!(has_namesake(&g, "OLI"), "Eve added an Oli");
        assert!(has_namesake(&g, " eve"), "Gus added an Eve");
        assert!(!has_namesake(&g, "Fay"), "Fay is us");
        assert!(!has_namesake(&g, "Kim"), "only our own placeholder");
        assert!(!has_namesake(&g, "Max"));
    }

    #[test]
    fn a_placeholder_is_listed_as_its_introducers_word() {
        let member = |name: &str, status: &str, by: Option<&str>| json!({"id": "abcd", "name": name, "status": status, "introduced_by": by});
        let listed = groups(&json!([{
            "id": "g1", "name": "Trio", "epoch": 1, "pending": true, "state": "invited",
            "queued_changes": 0,
            "members": [
                member("Blair", "self", Some("Alex")),
                member("Alex", "linked", None),
                member("Charlie", "placeholder", Some("Alex")),
            ],
        }]));
        assert!(listed.contains("Charlie"), "{listed}");
        assert!(
            listed.contains("placeholder  (as asserted by Alex, who may hold its key)"),
            "{listed}"
        );
        assert!(listed.contains("(introduced by Alex)"), "{listed}");
        // A peer who calls itself "me" is not us.
        let named_me = groups(&json!([{
            "id": "g2", "epoch": 1, "state": "active",
            "members": [member("Dana", "placeholder", Some("me"))],
        }]));
        assert!(
            named_me.contains("as asserted by me, who may"),
            "{named_me}"
        );
        let ours = groups(&json!([{
            "id": "g3", "epoch": 1, "state": "active",
            "members": [{"id": "abcd", "name": "Dana", "status": "placeholder",
                         "introduced_by": "me", "introduced_by_me": true}],
        }]));
        assert!(
            ours.contains("as asserted by you, who hold its key"),
            "{ours}"
        );
        assert!(listed.contains("pending: `protonode claim`"), "{listed}");
    }

    #[test]
    fn a_painted_qr_code_is_dark_on_light_on_any_terminal() {
        let painted = qr("protonode:TICKET", true).unwrap();
        let inner: Vec<&str> = painted
            .lines()
            .map(|line| {
                line.strip_prefix("\x1b[30;107m")
                    .and_then(|l| l.strip_suffix("\x1b[0m"))
                    .unwrap_or_else(|| panic!("not painted: {line:?}"))
            })
            .collect();
        // The quiet zone is light: the white background shows through.
        assert!(inner[0].chars().all(|c| c == ' '), "{:?}", inner[0]);
        assert!(inner.iter().any(|l| l.contains('█')));
        // Unpainted, it is drawn for a dark terminal: light as blocks.
        let plain = qr("protonode:TICKET", false).unwrap();
        let top = plain.lines().next().unwrap();
        assert!(!top.contains(' ') && !top.contains('\x1b'), "{top:?}");
        // What the note on its width says is what is drawn.
        let width = qr_width("protonode:TICKET").unwrap();
        assert!(inner.iter().all(|l| l.chars().count() == width));
        assert!(plain.lines().all(|l| l.chars().count() == width));
    }

    #[test]
    fn names_with_emoji_or_wide_characters_keep_the_columns_aligned() {
        let list = json!([
            {"id": "a1", "name": "Alex", "state": "active", "since": "2026-11-27T10:00:00.000Z",
             "fingerprint": "f1", "picture": "🦊"},
            {"id": "b2", "name": "李雷", "state": "active", "since": "2026-11-27T10:00:00.000Z",
             "fingerprint": "f2"},
        ]);
        let out = contacts(&list);
        let columns: Vec<usize> = out
            .lines()
            .map(|l| {
                let at = l.find("active").or_else(|| l.find("STATE")).unwrap();
                unicode_width::UnicodeWidthStr::width(&l[..at])
            })
            .collect();
        assert!(columns.iter().all(|c| *c == columns[0]), "{out}");
    }

    #[test]
    fn a_message_cannot_act_on_the_terminal_or_pose_as_another_line() {
        let spoof =
            "see you\n2026-11-27 19:31:00  me: I agree\r\x1b[31mRED\x1b[0m \u{202e}evil\ttab";
        let list = json!([{"from": "c1", "name": "Alex", "text": spoof,
            "at": "2026-11-27T10:00:00.000Z", "status": "received"}]);
        let out = history(&list, &json!([]));
        assert_eq!(
            out,
            "2026-11-27 10:00:00  Alex: see you\n    2026-11-27 19:31:00  me: I agree\\r\\u{1b}[31mRED\\u{1b}[0m \\u{202e}evil\ttab\n"
        );
        assert!(!out
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'));
        let watched = event(&json!({"event": "message", "kind": "contact",
            "message": {"from": "c1", "name": "Al\x1bex", "text": spoof,
            "at": "2026-11-27T10:00:00.000Z"}}));
        assert!(watched.starts_with("2026-11-27 10:00:00  Al\\u{1b}ex: see you\n    2026"));
    }

    #[test]
    fn watch_says_in_words_who_wrote_where_and_what_to_do_about_an_introduction() {
        let one_to_one = json!({"event": "message", "conversation": "c1", "kind": "contact",
            "conversation_name": "Blair", "message": {"from": "c1", "name": "Blair",
            "text": "hi", "at": "2026-11-27T10:00:00.000Z", "status": "received"}});
        assert_eq!(event(&one_to_one), "2026-11-27 10:00:00  Blair: hi");

        let placeholder = json!({"event": "message", "conversation": "g1", "kind": "group",
            "conversation_name": "Trio", "message": {"from": "ab12", "name": "Charlie",
            "asserted_by": "Alex", "text": "yo", "at": "2026-11-27T10:00:01.000Z",
            "status": "received"}});
        assert_eq!(
            event(&placeholder),
            "2026-11-27 10:00:01  Charlie (as asserted by Alex) in group \"Trio\": yo"
        );
        let unnamed = json!({"event": "message", "conversation": "g2", "kind": "group",
            "message": {"from": "ab12", "text": "yo", "at": "2026-11-27T10:00:02.000Z"}});
        assert_eq!(event(&unnamed), "2026-11-27 10:00:02  ab12 in group g2: yo");

        let introduced = json!({"event": "group", "group": "g1", "name": "Trio", "epoch": 1,
            "change": "introduced", "introduced_by": "Alex", "joined": ["Charlie"]});
        assert_eq!(
            event(&introduced),
            "Alex introduced you to Charlie in group \"Trio\" (g1): `protonode claim g1` joins it as yourself, `protonode decline g1` declines"
        );
        let added = json!({"event": "group", "group": "g1", "epoch": 7, "change": "introduced",
            "introduced_by": "Alex", "joined": ["B", "C", "D", "E", "F"]});
        assert!(
            event(&added).starts_with("Alex introduced you to B, C, D and 2 others in group g1:"),
            "{}",
            event(&added)
        );
        let older = json!({"event": "group", "group": "g1", "epoch": 1, "change": "introduced",
            "introduced_by": "Alex"});
        assert!(event(&older).starts_with("Alex introduced you in group g1:"));
        let entered = json!({"event": "group", "group": "g1", "name": "Trio", "epoch": 2,
            "change": "entered"});
        assert_eq!(
            event(&entered),
            "Your claim is ordered: you are in the group \"Trio\" (g1) under your own key (epoch 2)."
        );
        let left = json!({"event": "group", "group": "g2", "epoch": 4, "change": "left"});
        assert_eq!(
            event(&left),
            "You are no longer in group g2; `protonode history g2` still reads it."
        );
        let delivered = json!({"event": "delivery", "conversation": "g2", "message": "m1",
            "status": "delivered", "kind": "message", "member": "ab12-cd34"});
        assert_eq!(
            event(&delivered),
            "message m1 delivered at member ab12-cd34's node"
        );
        let answer = json!({"event": "delivery", "conversation": "c1", "message": "m2",
            "status": "delivered", "kind": "answer"});
        let named = json!({"event": "delivery", "conversation": "g2", "message": "m1",
            "status": "delivered", "kind": "message", "member": "ab12-cd34",
            "member_name": "Blair"});
        assert_eq!(event(&named), "message m1 delivered at Blair's node");
        let placeholder = json!({"event": "delivery", "conversation": "g2", "message": "m1",
            "status": "delivered", "kind": "message", "member": "ab12-cd34",
            "member_name": "Charlie", "asserted_by": "Alex"});
        assert_eq!(
            event(&placeholder),
            "message m1 delivered at the node of Charlie (as asserted by Alex)"
        );
        assert_eq!(event(&answer), "", "accept said it already");
        let refused = json!({"event": "delivery", "conversation": "c1", "message": "m2",
            "status": "failed", "kind": "answer"});
        assert_eq!(
            event(&refused),
            "your answer to an invitation was refused (contact c1): ask for a new ticket"
        );
        let comma = json!({"event": "group", "group": "g1", "epoch": 3, "change": "changed",
            "gone": ["Smith, Jo"]});
        assert_eq!(
            event(&comma),
            "In the group g1: Smith, Jo left or was removed (epoch 3)."
        );
        let rotated = json!({"event": "group", "group": "g1", "epoch": 5, "change": "changed",
            "updated": ["Blair", "me", "Cleo"]});
        assert_eq!(
            event(&rotated),
            "In the group g1: Blair, Cleo rotated their keys; you rotated your keys (epoch 5)."
        );
        let roster = json!({"event": "group", "group": "g1", "name": "Trio", "epoch": 3,
            "change": "changed", "claimed": ["Blair"], "gone": ["Dana", "Eli"]});
        assert_eq!(
            event(&roster),
            "In the group \"Trio\" (g1): Blair claimed their place; Dana, Eli left or were removed (epoch 3)."
        );
        let told = json!({"event": "group", "group": "g1", "epoch": 4, "change": "changed",
            "gone": ["Dana", "Eli", "Fay", "Gus"], "left": ["Dana"],
            "removed": [{"member": "Eli", "by": "Blair"},
                        {"member": "Fay", "by": "me", "placeholder": true}]});
        assert_eq!(
            event(&told),
            "In the group g1: Dana left; Blair removed Eli; Fay's placeholder was removed by you \
             (they declined, or you withdrew it); Gus left or was removed (epoch 4)."
        );
        let declined = json!({"event": "group", "group": "g1", "epoch": 5, "change": "changed",
            "gone": ["Hal"],
            "removed": [{"member": "Hal", "by": "me", "placeholder": true, "declined": true}]});
        assert_eq!(
            event(&declined),
            "In the group g1: Hal declined; you removed the placeholder (epoch 5)."
        );
        let expelled = json!({"event": "group", "group": "g2", "epoch": 6, "change": "left",
            "removed_by": "Blair"});
        assert_eq!(
            event(&expelled),
            "Blair removed you from group g2; `protonode history g2` still reads it."
        );
        let changed = json!({"event": "group", "group": "g2", "epoch": 5, "change": "changed"});
        assert_eq!(
            event(&changed),
            "The group g2 changed (epoch 5): `protonode groups` shows its members."
        );
    }
}
