"""A small conversation written for this project, so the quick start needs no download.

Six dated sessions between a user and an assistant, and twelve questions in LongMemEval's types
(one of them unanswerable, gold "Not answerable"). `DEMO` is in the dialogue format
(a JSON list of `Sample.to_dict()`): `python -c "import json, eval.demo_data as d; print(json.dumps(d.DEMO, indent=1))"`
shows what `scripts/process_*.py` write.
"""
from __future__ import annotations

NOT_ANSWERABLE = "Not answerable"  # the gold of an unanswerable question, as eval.datasets.NOT_ANSWERABLE


def _session(sid: str, time: str, *turns: str) -> dict:
    roles = ("user", "assistant")
    return {"id": sid, "time": time, "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def _question(qid: str, text: str, answer: str, qtype: str, **extra) -> dict:
    return {"id": qid, "text": text, "answer": answer, "type": qtype, "category": None, "category_name": None,
            "extra": {"abstention": qid.endswith("_abs"), **extra}}


DEMO: list[dict] = [
    {
        "id": "demo-1",
        "dataset": "demo",
        "current_time": "2024/06/10 (Mon) 12:00",
        "meta": {"description": "Demo conversation written for the MemBuilder reproduction"},
        "sessions": [
            _session(
                "demo_s1", "2024/03/04 (Mon) 09:12",
                "Hi! I moved to Portland last week for a new job as a data analyst at Green Leaf Foods.",
                "Congratulations on the move and the new job! How are you settling in?",
                "Pretty well. My beagle Biscuit loves the rain, so I want to find good hiking trails we can do together.",
                "For a dog-friendly start, try the Wildwood Trail in Forest Park: it is long, shaded and dogs on a leash are welcome.",
                "Great, we'll try it this weekend.",
            ),
            _session(
                "demo_s2", "2024/03/18 (Mon) 19:40",
                "I've started learning Spanish. My sister Maya and I are planning a trip to Mexico City in June.",
                "That sounds wonderful. Would you like a simple study routine?",
                "Yes please, something I can keep up with a full-time job.",
                "Here is one: 1. Review flashcards for 15 minutes every morning. 2. Listen to a Spanish podcast on your "
                "commute. 3. Book one conversation session with a tutor every week. 4. Each Sunday, write five sentences "
                "about your week in Spanish.",
                "Perfect, I'll start tomorrow.",
            ),
            _session(
                "demo_s3", "2024/04/02 (Tue) 08:05",
                "Quick update: Biscuit had his vet check-up yesterday. It turns out he is allergic to chicken, so we are "
                "switching him to a salmon-based food.",
                "Good to know. Salmon-based food is a common choice for dogs with chicken allergies. How is he doing?",
                "He's fine. Also, I ran my first 5K last Saturday and finished in 31 minutes!",
                "Congratulations, that is a solid time for a first race.",
            ),
            _session(
                "demo_s4", "2024/04/20 (Sat) 14:30",
                "Big news: my manager told me yesterday that I'm now leading the analytics team.",
                "Congratulations on the promotion! That is quick progress after only a couple of months.",
                "Thanks! One change of plans though: Maya has exams in June, so we moved the Mexico City trip to July.",
                "July is a lovely time to visit. Let me know if you want help planning the itinerary.",
            ),
            _session(
                "demo_s5", "2024/05/11 (Sat) 10:00",
                "Can you recommend a book for my flight?",
                "You might enjoy 'The Midnight Library' by Matt Haig, a novel about the lives we could have lived.",
                "I don't really read novels. I much prefer non-fiction, especially history and science.",
                "Then try 'Sapiens' by Yuval Noah Harari, a readable history of humankind.",
                "That sounds more like me, thanks.",
            ),
            _session(
                "demo_s6", "2024/06/01 (Sat) 16:20",
                "I ran a 10K this morning in 58 minutes!",
                "Fantastic, you have come a long way since your first 5K.",
                "And Biscuit turned four yesterday, so we celebrated with a long walk in Forest Park.",
                "Happy birthday to Biscuit! Four is a great age for a beagle.",
                "I also bought a bike, so I'll start cycling to work next week.",
            ),
        ],
        "questions": [
            _question("demo_q1", "What is the name of my dog?", "Biscuit", "single-session-user"),
            _question("demo_q2", "Which company did I join when I moved to Portland?", "Green Leaf Foods",
                      "single-session-user"),
            _question("demo_q3", "Which trail did you suggest for hiking with my dog?",
                      "The Wildwood Trail in Forest Park", "single-session-assistant"),
            _question("demo_q4", "What study routine did you suggest for my Spanish?",
                      "15 minutes of flashcards every morning, a Spanish podcast on the commute, a weekly conversation "
                      "session with a tutor, and five sentences about the week in Spanish each Sunday",
                      "single-session-assistant"),
            _question("demo_q5", "How many races have I run since moving to Portland, and what distances?",
                      "Two: a 5K and a 10K", "multi-session"),
            _question("demo_q6", "What breed is my dog and what food is he allergic to?",
                      "He is a beagle and he is allergic to chicken", "multi-session"),
            _question("demo_q7", "How many days passed between my 5K and my 10K?",
                      "63 days (30 March to 1 June 2024)", "temporal-reasoning"),
            _question("demo_q8", "On what date is my dog's birthday?", "31 May", "temporal-reasoning"),
            _question("demo_q9", "What is my current role at work?", "I lead the analytics team at Green Leaf Foods",
                      "knowledge-update"),
            _question("demo_q10", "In which month am I travelling to Mexico City with my sister?", "July",
                      "knowledge-update"),
            _question("demo_q11", "Can you recommend something for me to read next?",
                      "The user prefers non-fiction, especially history and science; a good answer suggests a "
                      "non-fiction book of that kind rather than a novel", "single-session-preference"),
            _question("demo_q12_abs", "What university does my sister Maya attend?", NOT_ANSWERABLE,
                      "single-session-user"),
        ],
    }
]
