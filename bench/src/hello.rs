//! `hello` mode: what a `hello` costs a user with many rooms (protocol 1.1: `welcome`
//! lists the user's rooms with unread counts, computed in one store query).
//!
//! Setup: one user (`hb-reader`) makes `--rooms` rooms its own (`join` with
//! `persist`, then `leave`), a writer sends `--messages` into each, and the reader
//! reads half of every room. Then `--repeat` fresh connections say `hello` as the
//! reader, and as many say it as new users without rooms; the report is the time
//! from sending `hello` to the complete `welcome`, for both, and the welcome's size.

use crate::client::{self, Conn, Frame, Target};
use anyhow::{Context, bail};
use bytes::Buf;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

/// Send `cmd` (which must carry `"id":<id>`) and wait for the line answering it.
async fn request(c: &mut Conn, cmd: &str, id: u64) -> anyhow::Result<String> {
    client::send_text(&mut c.write, cmd).await?;
    reply(c, id).await
}

/// Wait for the line carrying `"id":<id>`; an `error` is a failure.
async fn reply(c: &mut Conn, id: u64) -> anyhow::Result<String> {
    let needle = format!(r#""id":{id},"#);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        while let Some((frame, used)) = client::next_frame(&c.buf) {
            let mut found = None;
            if let Frame::Text(r) = frame {
                let text = String::from_utf8_lossy(&c.buf[r]).to_string();
                found = text
                    .split('\n')
                    .find(|l| l.contains(&needle))
                    .map(str::to_owned);
            }
            c.buf.advance(used);
            if let Some(line) = found {
                if line.starts_with(r#"{"type":"error""#) {
                    bail!("server refused: {line}");
                }
                return Ok(line);
            }
        }
        let more = tokio::time::timeout_at(deadline, client::fill(&mut c.read, &mut c.buf))
            .await
            .context("no reply within 60 s")?;
        if !more {
            bail!("closed while waiting for reply {id}");
        }
    }
}

async fn hello(target: &Target, i: usize, name: &str) -> anyhow::Result<(Conn, String)> {
    let mut c = client::connect(target, i).await?;
    let w = request(
        &mut c,
        &format!(r#"{{"type":"hello","id":1,"name":"{name}"}}"#),
        1,
    )
    .await?;
    Ok((c, w))
}

pub struct Report {
    pub with_rooms: Histogram<u64>,
    pub without: Histogram<u64>,
    pub welcome_bytes: usize,
    pub rooms_listed: usize,
}

pub async fn run(
    target: &Target,
    rooms: usize,
    messages: usize,
    repeat: usize,
) -> anyhow::Result<Report> {
    let (mut reader, _) = hello(target, 0, "hb-reader").await?;
    let (mut writer, _) = hello(target, 1, "hb-writer").await?;
    let mut id = 10u64;
    for r in 0..rooms {
        let room = format!("hb-{r}");
        id += 1;
        request(
            &mut reader,
            &format!(r#"{{"type":"join","id":{id},"room":"{room}","persist":true,"history":0}}"#),
            id,
        )
        .await?;
        id += 1;
        request(
            &mut reader,
            &format!(r#"{{"type":"leave","id":{id},"room":"{room}"}}"#),
            id,
        )
        .await?;
        id += 1;
        request(
            &mut writer,
            &format!(r#"{{"type":"join","id":{id},"room":"{room}","history":0}}"#),
            id,
        )
        .await?;
        // Pipelined sends, then wait for the last ack (acks of one connection
        // come in order).
        for m in 0..messages {
            id += 1;
            client::send_text(
                &mut writer.write,
                &format!(r#"{{"type":"send","id":{id},"room":"{room}","text":"m{m}"}}"#),
            )
            .await?;
        }
        reply(&mut writer, id).await?;
        id += 1;
        request(
            &mut writer,
            &format!(r#"{{"type":"leave","id":{id},"room":"{room}"}}"#),
            id,
        )
        .await?;
        id += 1;
        let half = messages / 2;
        request(
            &mut reader,
            &format!(r#"{{"type":"read","id":{id},"room":"{room}","seq":{half}}}"#),
            id,
        )
        .await?;
        if r % 100 == 99 {
            eprintln!("hello: {} of {rooms} rooms set up", r + 1);
        }
    }
    let mut with_rooms = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut without = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut welcome_bytes = 0;
    let mut rooms_listed = 0;
    for k in 0..repeat {
        for (name, h) in [
            ("hb-reader".to_owned(), &mut with_rooms),
            (format!("hb-new-{k}"), &mut without),
        ] {
            let started = Instant::now();
            let (c, w) = hello(target, 2 + k, &name).await?;
            h.record((started.elapsed().as_micros() as u64).max(1))?;
            if name == "hb-reader" {
                welcome_bytes = w.len();
                rooms_listed = w.matches(r#""room":"#).count();
            }
            drop(c);
        }
    }
    Ok(Report {
        with_rooms,
        without,
        welcome_bytes,
        rooms_listed,
    })
}
